"""Shared fixtures: throwaway systemd containers (see clusterkit.container), and
workers run as local processes with sockets passed as systemd does (see localworker.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from localworker import APP, NotifySocket, Proc

from clusterkit.container import Container, prerequisites_missing


@pytest.fixture
def containers_available() -> None:
    """Skip when containers cannot run here; on CI (``CI`` set) that is a failure instead."""
    reason = prerequisites_missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must be able to boot systemd containers: {reason}")
    pytest.skip(reason)


@pytest.fixture
def make_container(containers_available: None) -> Iterator[Callable[..., Container]]:
    """Factory: ``make_container(**Container kwargs)`` boots one more container.

    Every container it made is powered off at teardown, whatever the test did.
    """
    made: list[Container] = []

    def make(**kwargs: object) -> Container:
        c = Container(**kwargs)  # type: ignore[arg-type]
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.poweroff()


@pytest.fixture
def container(make_container: Callable[..., Container]) -> Container:
    """A booted container with a private network, powered off after the test."""
    return make_container()


# -- workers as local processes (test_worker.py, test_serve.py) ------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A NOTIFY_SOCKET bound by the test; read what the worker sends with its methods."""
    ns = NotifySocket(tmp_path / "notify")
    yield ns
    ns.close()


@pytest.fixture
def app_script(tmp_path: Path) -> Path:
    """The worker script (localworker.APP); its first argument picks the serving path."""
    path = tmp_path / "server.py"
    path.write_text(APP)
    return path


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Worker processes a test started: append them; each is stopped at teardown."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()
