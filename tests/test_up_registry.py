"""`up`'s registry, /run/clusterkit/up/NAME: which container root's commands use for a
cluster `up` runs. A record outlives an `up` that was killed (SIGHUP, SIGKILL), and its
pid may then belong to any process, even a user's own program named "systemd": root's
commands would read that process's journal and nsenter its namespaces. No container
needed: the processes here are programs renamed "systemd".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clusterkit import manager

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="runs a process as another user"
)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "run" / "clusterkit" / "up"
    monkeypatch.setattr(manager, "UP_REGISTRY", path)
    return path


@pytest.fixture
def named_systemd() -> Iterator[Callable[..., int]]:
    """Start `sleep`, renamed systemd, as root or as another user; stopped at the end."""
    where = Path(tempfile.mkdtemp(prefix="ck-registry-"))  # not under pytest's 0700 tmp
    where.chmod(0o755)
    program = where / "systemd"
    shutil.copy("/bin/sleep", program)
    started: list[subprocess.Popen] = []

    def start(uid: int = 0) -> int:
        p = subprocess.Popen([str(program), "60"], user=uid or None)
        started.append(p)
        return p.pid

    yield start
    for p in started:
        p.kill()
        p.wait()
    shutil.rmtree(where)


def test_a_record_names_the_process_it_was_written_for(registry: Path, named_systemd):
    pid = named_systemd()
    manager.register_up("web", pid)
    found = manager.up_manager("web")
    assert found is not None and found.container_pid == pid


def test_a_stale_record_names_no_other_process(registry: Path, named_systemd):
    """The pid of a record now belongs to another process named systemd: started later,
    or a user's."""
    pid = named_systemd()
    manager.register_up("web", pid)
    record = (registry / "web").read_text().split()
    (registry / "web").write_text(f"{pid} {int(record[1]) - 1}\n")  # an earlier process
    assert manager.up_manager("web") is None
    users = named_systemd(uid=65534)  # nobody's own "systemd", at the record's pid
    (registry / "web").write_text(f"{users} {manager._started_at(users)}\n")
    assert manager.up_manager("web") is None
    os.chmod(registry / "web", 0o600)
    (registry / "web").write_text(f"{users}\n")  # the old form: a pid alone
    assert manager.up_manager("web") is None
