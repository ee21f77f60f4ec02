"""The container harness itself, on real systemd booted in systemd-nspawn."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from scenario import wait_for

import clusterkit
from clusterkit.container import Container, ContainerError

PORT = 8080

# A socket-activated HTTP server: systemd owns the port, python3 gets fd 3 and
# answers with the hostname (the machine name), so each container is identifiable.
SERVER = """\
import http.server, socket
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = socket.gethostname().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
srv = http.server.HTTPServer(("", 0), Hello, bind_and_activate=False)
srv.socket = socket.socket(fileno=3)
srv.serve_forever()
"""

SOCKET_UNIT = f"""\
[Socket]
ListenStream=127.0.0.1:{PORT}
"""

SERVICE_UNIT = """\
[Service]
ExecStart=/usr/bin/python3 /srv/hello.py
"""


def serve_hello(c: Container, tmp_path: Path) -> None:
    """Install and start the socket-activated hello server in ``c``."""
    (tmp_path / "ck-hello.socket").write_text(SOCKET_UNIT)
    (tmp_path / "ck-hello.service").write_text(SERVICE_UNIT)
    c.write_file("/srv/hello.py", SERVER)
    c.install_units([tmp_path / "ck-hello.socket", tmp_path / "ck-hello.service"])
    c.systemctl("start", "ck-hello.socket")


def leftovers(name: str, nspawn_pid: int) -> list[str]:
    """What a powered-off container could have left behind on the host."""
    found = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{name}")]
    if Path("/sys/fs/cgroup", name).exists():
        found.append(f"/sys/fs/cgroup/{name}")
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"--machine={name}".encode() in argv:
            found.append(f"process {proc.name}")
    if Path(f"/proc/{nspawn_pid}").exists():
        found.append(f"nspawn pid {nspawn_pid}")
    return found


def test_boots_with_systemd_as_pid1(container: Container) -> None:
    assert container.run("cat", "/proc/1/comm").stdout == "systemd\n"
    state = container.systemctl("is-system-running", check=False).stdout.strip()
    assert state in ("running", "degraded")
    assert container.run("hostname").stdout.strip() == container.name
    assert container.name.startswith("ck-")
    assert Path(f"/proc/{container.pid}/comm").read_text() == "systemd\n"


def test_run_returns_output_and_exit_code(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = container.run("sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert container.run("cat", input="stdin text").stdout == "stdin text"
    assert container.run("sh", "-c", 'echo "$FOO"', env={"FOO": "bar"}).stdout == "bar\n"

    monkeypatch.setenv("CK_HOST_ONLY", "1")  # the host's environment stays outside
    assert "CK_HOST_ONLY" not in container.run("env").stdout

    with pytest.raises(ContainerError, match="exited 7") as info:
        container.run("sh", "-c", "exit 7", check=True)
    assert info.value.result is not None and info.value.result.returncode == 7


def test_run_timeout(container: Container) -> None:
    # The timeout fires (TimeoutExpired) and the command inside is gone with it.
    with pytest.raises(subprocess.TimeoutExpired):
        container.run("sleep", "30", timeout=0.5)
    assert "sleep 30" not in container.run("ps", "-eo", "args").stdout


def test_checkout_venv_runs_inside(container: Container) -> None:
    code = "import clusterkit, jinja2, systemd.journal; print(clusterkit.__file__)"
    r = container.run(sys.executable, "-c", code, check=True)
    assert r.stdout.strip() == clusterkit.__file__


def test_write_file_lands_inside_only(container: Container) -> None:
    path = f"/etc/{container.name}/x.conf"
    container.write_file(path, "hello\n", mode=0o600)
    assert container.run("cat", path).stdout == "hello\n"
    assert container.run("stat", "-c", "%a", path).stdout.strip() == "600"
    assert not Path(path).exists()  # the root is a tmpfs, not the host's /


def test_socket_activated_unit_serves_http(container: Container, tmp_path: Path) -> None:
    serve_hello(container, tmp_path)
    assert container.systemctl("is-active", "ck-hello.service", check=False).stdout == (
        "inactive\n"
    )
    assert container.http_get(PORT) == (200, container.name)
    assert container.systemctl("is-active", "ck-hello.service", check=False).stdout == "active\n"

    # a host program in the container's network namespace reaches the same port
    fetch = (
        f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{PORT}/').read())"
    )
    r = container.netns_run(sys.executable, "-c", fetch, check=True)
    assert r.stdout.strip() == repr(container.name.encode())

    # systemd's own records of the unit are in the container's journal
    started = [e for e in container.journal("_PID=1", "UNIT=ck-hello.service")]
    assert any(str(e.get("MESSAGE", "")).startswith("Started") for e in started)


def test_journal_is_parsed(container: Container) -> None:
    container.run("systemd-cat", "-t", "ck-test", "echo", "hello journal", check=True)
    wait_for(
        "the message in the journal",
        lambda: "hello journal" in [e.get("MESSAGE") for e in container.journal("-t", "ck-test")],
    )


def test_two_containers_run_concurrently_with_own_loopback(
    make_container: Callable[..., Container], tmp_path: Path
) -> None:
    a, b = make_container(), make_container()
    assert a.name != b.name and a.pid != b.pid
    serve_hello(a, tmp_path)
    serve_hello(b, tmp_path)  # same port: each container has its own loopback
    assert a.http_get(PORT) == (200, a.name)
    assert b.http_get(PORT) == (200, b.name)
    a.poweroff()
    assert b.http_get(PORT) == (200, b.name)  # b is unaffected


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_poweroff_cleans_up_when_body_raises(
    containers_available: None, exc: type[BaseException]
) -> None:
    c = Container()
    with pytest.raises(exc):
        with c:
            assert c.running
            assert leftovers(c.name, c.nspawn_pid)  # sanity: the check sees a live one
            raise exc("boom")
    assert not c.running
    assert leftovers(c.name, c.nspawn_pid) == []
    c.poweroff()  # idempotent


def test_boot_failure_reports_log_and_cleans_up(containers_available: None) -> None:
    c = Container(binds=["/nonexistent/ck-missing"])
    with pytest.raises(ContainerError, match="boot log") as info:
        c.start(timeout=30)
    assert "ck-missing" in str(info.value)
    assert leftovers(c.name, c.nspawn_pid) == []


def test_poweroff_timeout_kills(containers_available: None) -> None:
    c = Container().start()
    c.poweroff(timeout=0.001)  # too short for a clean shutdown: SIGKILL path
    assert leftovers(c.name, c.nspawn_pid) == []


def test_start_timeout_cleans_up(containers_available: None) -> None:
    c = Container()
    with pytest.raises(ContainerError, match="timed out"):
        c.start(timeout=0.05)
    assert leftovers(c.name, c.nspawn_pid) == []


def test_shared_network_option(make_container: Callable[..., Container]) -> None:
    c = make_container(private_network=False)
    host_links = {p.name for p in Path("/sys/class/net").iterdir()}
    inside = set(c.run("ls", "/sys/class/net", check=True).stdout.split())
    assert inside == host_links
