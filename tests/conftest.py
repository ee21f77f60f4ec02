"""Shared fixtures: throwaway systemd containers (see clusterkit.container)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

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
