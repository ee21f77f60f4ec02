"""--manager user / install --user / --user control, against a real user manager."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import scenario
from scenario import wait_for

from clusterkit.container import Container

PY = sys.executable
APP = Path(__file__).resolve().parent / "apps" / "hello_any_port.py"
UID = 1000
HOME = "/home/alice"
# A worker never runs as root, so the user manager is an ordinary user's. Reading
# its units' records from the (volatile) system journal takes systemd-journal.
AS_ALICE = ("setpriv", f"--reuid={UID}", f"--regid={UID}", "--init-groups")
USER_ENV = {"XDG_RUNTIME_DIR": f"/run/user/{UID}", "HOME": HOME}


@pytest.fixture
def user_container(make_container: Callable[..., Container]) -> Container:
    # A user manager needs PAM's configuration; the container's /etc starts empty.
    c = make_container(binds_ro=["/etc/pam.d", "/etc/security"])
    c.run("useradd", "-m", "-u", str(UID), "-G", "systemd-journal", "alice", check=True)
    c.systemctl("start", f"user@{UID}.service")
    return c


def ck_as_alice(c: Container, *args: str) -> subprocess.CompletedProcess[str]:
    """``clusterkit ARGS`` as alice, in her session's environment (the caller checks the exit)."""
    return scenario.ck(c, *args, check=False, prefix=AS_ALICE, env=USER_ENV)


def test_user_units_install_serve_and_report_exits(user_container: Container, tmp_path: Path):
    c = user_container
    out = tmp_path / "units"
    r = subprocess.run(
        [
            PY,
            "-m",
            "clusterkit.cli",
            "generate",
            "--name",
            "mine",
            "--manager",
            "user",
            "--exec",
            f"{PY} {APP}",
            "--workers",
            "2",
            "--listen",
            "8080",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    service = (out / "mine@.service").read_text()
    assert "DynamicUser" not in service and "ProtectSystem" not in service
    for f in out.iterdir():
        c.write_file(f"{HOME}/units/{f.name}", f.read_text())
    c.run("chown", "-R", f"{UID}:{UID}", f"{HOME}/units", check=True)

    # System units refuse --user; user units install into ~/.config/systemd/user.
    r = ck_as_alice(c, "install", "mine", "--from", f"{HOME}/units", "--user", "--now")
    assert r.returncode == 0, r.stdout + r.stderr
    installed = Path(f"/proc/{c.pid}/root{HOME}/.config/systemd/user/mine@.service")
    assert installed.exists()

    def serving() -> bool:
        try:
            return c.http_get(8080, timeout=2) == (200, "hello world\n")
        except OSError:
            return False

    wait_for("the user cluster to serve", serving)
    status = json.loads(ck_as_alice(c, "status", "mine", "--json", "--user").stdout)
    assert sorted(w["id"] for w in status) == [0, 1]
    victim = next(w for w in status if w["id"] == 1)["pid"]

    assert ck_as_alice(c, "kill", "mine", "1", "--signal", "SIGKILL", "--user").returncode == 0

    def exit_seen() -> bool:
        lines = ck_as_alice(c, "events", "mine", "--json", "--user").stdout.splitlines()
        return any(
            e["event"] == "exit"
            and e["worker"] == 1
            and e["pid"] == victim
            and e["signal"] == "SIGKILL"
            and e["code"] is None
            for e in map(json.loads, lines)
        )

    wait_for("the SIGKILL exit event", exit_seen)
    wait_for(
        "worker 1 back",
        lambda: any(
            w["id"] == 1 and w["pid"] not in (None, victim) and w["state"] == "listening"
            for w in json.loads(ck_as_alice(c, "status", "mine", "--json", "--user").stdout)
        ),
    )
    assert ck_as_alice(c, "uninstall", "mine", "--user").returncode == 0
    assert not installed.exists()


def test_system_units_are_refused_by_a_user_manager(user_container: Container, tmp_path: Path):
    c = user_container
    out = tmp_path / "units"
    subprocess.run(
        [
            PY,
            "-m",
            "clusterkit.cli",
            "generate",
            "--name",
            "sys",
            "--exec",
            f"{PY} {APP}",
            "--workers",
            "1",
            "--output",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    for f in out.iterdir():
        c.write_file(f"{HOME}/units/{f.name}", f.read_text())
    c.run("chown", "-R", f"{UID}:{UID}", f"{HOME}/units", check=True)
    r = ck_as_alice(c, "install", "sys", "--from", f"{HOME}/units", "--user")
    assert r.returncode == 2
    assert "--manager user" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_root_user_manager_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "units"
    generate = [PY, "-m", "clusterkit.cli", "generate", "--name", "mine", "--manager", "user"]
    subprocess.run([*generate, "--exec", f"{PY} {APP}", "--output", str(out)], check=True)
    r = subprocess.run(
        [PY, "-m", "clusterkit.cli", "install", "mine", "--from", str(out), "--user"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "as root" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
