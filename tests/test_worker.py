"""The worker shim against sockets passed the way systemd passes them.

``systemd-socket-activate`` (from the systemd package) binds the port, waits
for the first connection and execs the worker with fd 3, ``LISTEN_FDS``,
``LISTEN_PID`` and ``LISTEN_FDNAMES``, as PID 1 does. A unix datagram socket
bound by the test stands in for ``NOTIFY_SOCKET``. Where a test needs the
socket to outlive a worker (PID 1 keeps it open), the test itself holds it and
passes it as fd 3 through a tiny launcher that sets LISTEN_PID and execs.

The helpers here are shared with test_serve.py.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PYTHON = sys.executable
ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate missing")

# The worker script every test runs: MODE picks the serving path.
APP = r"""
import json, os, sys, time
if os.environ.get("CK_NO_UVLOOP"):
    sys.modules["uvloop"] = None
from clusterkit import cluster, worker as worker_mod

mode, port = sys.argv[1], sys.argv[2]
address = int(port) if port.isdigit() else (None if port == "-" else port)
w = worker_mod.current()

def info():
    s = w.listen(address)
    return json.dumps({
        "id": w.id, "pid": w.pid, "name": w.name, "unit": w.unit,
        "activated": w.is_socket_activated, "fd": s.fileno(),
        "sockets": [x.fileno() for x in w.sockets()],
        "is_worker": cluster.is_worker, "invocation_id": w.invocation_id,
        "uvloop": sys.modules.get("uvloop") is not None,
    })

if mode == "asyncio":
    import asyncio
    from clusterkit.serve import serve_asyncio
    async def handler(req):
        if req.path == "/slow":
            await asyncio.sleep(float(os.environ.get("CK_SLOW", "0.3")))
        elif req.path == "/hang":
            time.sleep(60)              # blocks the event loop
        elif req.path == "/info":
            return info()
        elif req.path == "/echo":
            return req.method + " " + req.body.decode()
        return "Hello Http"
    serve_asyncio(handler, address, drain_timeout=float(os.environ.get("CK_DRAIN", "10")))
elif mode == "asgi":
    import asyncio
    from clusterkit.serve import serve_asgi
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        body = b"Hello Http"
        if path == "/slow":
            await asyncio.sleep(float(os.environ.get("CK_SLOW", "0.3")))
        elif path == "/hang":
            time.sleep(60)
        elif path == "/info":
            body = info().encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})
    serve_asgi(app, address, drain_timeout=float(os.environ.get("CK_DRAIN", "10")),
               log_level="warning")
elif mode == "wsgi":
    from clusterkit.serve import serve_wsgi
    def app(environ, start_response):
        path = environ["PATH_INFO"]
        body = b"Hello Http"
        if path == "/slow":
            time.sleep(float(os.environ.get("CK_SLOW", "0.3")))
        elif path == "/hang":
            time.sleep(60)
        elif path == "/info":
            body = info().encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]
    serve_wsgi(app, address, drain_timeout=float(os.environ.get("CK_DRAIN", "10")),
               threads=int(os.environ.get("CK_THREADS", "4")))
elif mode == "listen":
    # print what listen() returns for each address in argv[2:] (several passed sockets)
    out = {}
    for a in sys.argv[2:]:
        try:
            s = w.listen(None if a == "-" else int(a) if a.isdigit() else a)
            out[a] = s.fileno()
        except LookupError as e:
            out[a] = "error: " + str(e)
    print(json.dumps(out), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotifySocket:
    """A NOTIFY_SOCKET: a unix datagram socket the test binds and reads in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def assignments(self) -> list[str]:
        return [line for _, m in list(self.messages) for line in m.splitlines()]

    def times(self, line: str) -> list[float]:
        return [t for t, m in list(self.messages) if line in m.splitlines()]

    def wait_for(self, line: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if line in self.assignments():
                return
            time.sleep(0.02)
        raise AssertionError(f"no {line!r} within {timeout}s; got {self.assignments()}")

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(2)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify")
    yield ns
    ns.close()


@pytest.fixture
def app_script(tmp_path: Path) -> Path:
    path = tmp_path / "server.py"
    path.write_text(APP)
    return path


class Proc:
    """A worker process we started; stopped (killed if need be) at teardown."""

    def __init__(self, argv: list[str], **kw) -> None:
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def terminate(self) -> None:
        self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 20.0) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.communicate(timeout=10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def activate_argv(
    port: int, script: Path, mode: str, address: str | int, env: dict[str, str]
) -> list[str]:
    """systemd-socket-activate with the environment a clusterkit unit gives."""
    argv = [ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=http"]
    for k, v in env.items():
        argv.append(f"-E{k}={v}")
    return argv + [PYTHON, str(script), mode, str(address)]


def unit_env(notify: NotifySocket | None, worker_id: int = 1, **extra: str) -> dict[str, str]:
    env = {
        "CLUSTERKIT_NAME": "hello",
        "CLUSTERKIT_WORKER_ID": str(worker_id),
        "CLUSTERKIT_SCHEDULING": "shared",
    }
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify.path
    env.update(extra)
    return env


def request(
    port: int, path: str = "/", timeout: float = 10.0, retry_refused: float = 0.0, **kw
) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection; retries a refused connect for *retry_refused* s."""
    deadline = time.monotonic() + retry_refused
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request(kw.pop("method", "GET"), path, **kw)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
        finally:
            conn.close()


def start_activated(
    procs: list[Proc],
    script: Path,
    mode: str,
    notify: NotifySocket | None,
    address: str | int | None = None,
    **extra: str,
) -> tuple[Proc, int]:
    """Start a worker under systemd-socket-activate; the first request execs it."""
    port = free_port()
    argv = activate_argv(
        port, script, mode, port if address is None else address, unit_env(notify, **extra)
    )
    p = Proc(argv)
    procs.append(p)
    status, _, body = request(port, "/", retry_refused=5.0)
    assert (status, body) == (200, b"Hello Http")
    return p, port


# What PID 1 does for a socket it keeps: the socket at fd 3, LISTEN_PID = the exec'd pid.
_EXEC_WITH_FD3 = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
    "os.environ.setdefault('LISTEN_PID', str(os.getpid())); os.execv(sys.argv[2], sys.argv[2:])"
)


def with_socket_as_fd3(sock: socket.socket, argv: list[str], **kw) -> Proc:
    """Start *argv* with *sock* passed as fd 3 (LISTEN_FDS etc. come from kw['env']).

    LISTEN_PID is set to the exec'd pid unless the env already has one.
    """
    launcher = [PYTHON, "-c", _EXEC_WITH_FD3, str(sock.fileno())]
    return Proc(launcher + argv, pass_fds=(sock.fileno(),), **kw)


def listening_inodes(pid: int) -> set[str]:
    """Inodes of the listening TCP sockets among *pid*'s fds."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":  # TCP_LISTEN
                listening.add(f[9])
    mine = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inode = target[8:-1]
            if inode in listening:
                mine.add(fd)
    return mine


# -- tests ------------------------------------------------------------------


@needs_activate
def test_socket_activated_worker_uses_passed_fd(procs, app_script, notify_socket):
    p, port = start_activated(procs, app_script, "asyncio", notify_socket)
    status, _, body = request(port, "/info")
    info = json.loads(body)
    assert status == 200
    assert info["pid"] == p.pid  # systemd-socket-activate exec'd the worker: LISTEN_PID
    assert info["activated"] is True
    assert info["fd"] == 3 and info["sockets"] == [3]
    assert info["id"] == 1 and info["unit"] == "hello@1.service" and info["is_worker"] is True
    # the only listening socket the worker holds is fd 3, bound by systemd-socket-activate
    assert listening_inodes(p.pid) == {"3"}
    notify_socket.wait_for("READY=1")
    assert notify_socket.assignments().count("READY=1") == 1


@needs_activate
def test_one_passed_socket_is_used_whatever_port_the_code_names(procs, app_script, notify_socket):
    # The unit owns the address: code saying listen(3000) serves on the unit's port.
    p, port = start_activated(procs, app_script, "asyncio", notify_socket, address=3000)
    info = json.loads(request(port, "/info")[2])
    assert info["fd"] == 3 and info["activated"] is True
    assert listening_inodes(p.pid) == {"3"}


@needs_activate
def test_sigterm_drains_in_flight_and_exits_0(procs, app_script, notify_socket):
    p, port = start_activated(procs, app_script, "asyncio", notify_socket, CK_SLOW="0.8")
    notify_socket.wait_for("READY=1")
    results: list[object] = []

    def slow() -> None:
        try:
            results.append(request(port, "/slow")[0])
        except Exception as e:  # noqa: BLE001 - recorded and asserted below
            results.append(e)

    threads = [threading.Thread(target=slow) for _ in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the requests are in flight
    p.terminate()
    for t in threads:
        t.join(10)
    assert results == [200] * 5
    assert p.wait() == 0
    assert "STOPPING=1" in notify_socket.assignments()


@needs_activate
def test_watchdog_pings_stop_when_the_loop_hangs(procs, app_script, notify_socket):
    # WATCHDOG_USEC=400ms: pings every ~200ms from the event loop
    p, port = start_activated(procs, app_script, "asyncio", notify_socket, WATCHDOG_USEC="400000")
    time.sleep(1.0)
    assert len(notify_socket.times("WATCHDOG=1")) >= 3
    hang = threading.Thread(target=lambda: _ignore(request, port, "/hang", timeout=3), daemon=True)
    hang.start()
    time.sleep(0.3)
    before = len(notify_socket.times("WATCHDOG=1"))
    time.sleep(1.2)  # three intervals: a healthy worker would ping 6 times
    assert len(notify_socket.times("WATCHDOG=1")) == before


def _ignore(f, *a, **kw) -> None:
    try:
        f(*a, **kw)
    except Exception:  # noqa: BLE001
        pass


@needs_activate
def test_watchdog_pid_of_another_process_disables_pings(procs, app_script, notify_socket):
    start_activated(
        procs, app_script, "asyncio", notify_socket, WATCHDOG_USEC="200000", WATCHDOG_PID="1"
    )
    time.sleep(0.6)
    assert notify_socket.times("WATCHDOG=1") == []


def test_development_mode_binds_itself(procs, app_script, notify_socket):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "CLUSTERKIT_"))}
    env["NOTIFY_SOCKET"] = notify_socket.path
    p = Proc([PYTHON, str(app_script), "asyncio", f"127.0.0.1:{port}"], env=env)
    procs.append(p)
    status, _, body = request(port, "/info", retry_refused=10.0)
    info = json.loads(body)
    assert info["activated"] is False and info["sockets"] == []
    assert info["is_worker"] is False and info["unit"] is None and info["id"] == 0
    assert info["name"] == "server"
    assert listening_inodes(p.pid) == {str(info["fd"])}
    p.terminate()
    assert p.wait() == 0


def test_listen_pid_of_another_process_is_ignored(procs, app_script):
    # a socket on fd 3 with LISTEN_* meant for another pid: not ours, leave it alone
    decoy = socket.create_server(("127.0.0.1", 0))
    port = free_port()
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID="1", LISTEN_FDNAMES="http")
    env.pop("CLUSTERKIT_WORKER_ID", None)
    p = with_socket_as_fd3(
        decoy, [PYTHON, str(app_script), "asyncio", f"127.0.0.1:{port}"], env=env
    )
    decoy.close()
    procs.append(p)
    info = json.loads(request(port, "/info", retry_refused=10.0)[2])
    assert info["activated"] is False and info["sockets"] == [] and info["fd"] != 3


@needs_activate
def test_several_passed_sockets_pick_by_address(tmp_path, app_script):
    port, other = free_port(), free_port()
    path = str(tmp_path / "x.sock")
    argv = [
        ACTIVATE,
        "-l",
        f"127.0.0.1:{port}",
        "-l",
        path,
        "--fdname=http:http",
        "-ECLUSTERKIT_WORKER_ID=0",
        PYTHON,
        str(app_script),
        "listen",
        "-",
        str(port),
        path,
        str(other),
        f"127.0.0.1:{port}",
    ]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:  # the first connection makes systemd-socket-activate exec the script
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        out, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    result = json.loads(out.strip().splitlines()[-1])
    assert result[str(port)] == 3
    assert result[path] == 4
    assert result[f"127.0.0.1:{port}"] == 3
    assert result[str(other)].startswith("error:") and "none of which matches" in result[str(other)]
    assert "several sockets" in result["-"]


def test_worker_identity_from_unit_environment():
    from clusterkit.worker import Worker

    w = Worker({"CLUSTERKIT_WORKER_ID": "2", "CLUSTERKIT_NAME": "hello", "INVOCATION_ID": "ab12"})
    assert (w.id, w.name, w.unit, w.invocation_id, w.pid) == (
        2,
        "hello",
        "hello@2.service",
        "ab12",
        os.getpid(),
    )
    dev = Worker({})
    assert dev.id == 0 and dev.unit is None and dev.managed is False


def test_in_a_unit_without_a_socket_listen_raises():
    from clusterkit.worker import Worker

    w = Worker({"CLUSTERKIT_WORKER_ID": "2", "CLUSTERKIT_NAME": "hello", "INVOCATION_ID": "ab12"})
    with pytest.raises(LookupError, match="without a listening socket"):
        w.listen(free_port())


def test_cluster_facade_in_worker_does_not_import_primary_or_heavy_modules():
    code = (
        "import sys\n"
        "from clusterkit import cluster\n"
        "assert cluster.is_worker and not cluster.is_primary and not cluster.is_master\n"
        "assert cluster.worker.id == 3 and cluster.worker.unit == 'hello@3.service'\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jinja2', 'asyncio', 'click')"
        " or m in ('clusterkit.primary', 'clusterkit.cli', 'clusterkit.render',"
        " 'clusterkit.spec', 'systemd.journal')]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, CLUSTERKIT_WORKER_ID="3", CLUSTERKIT_NAME="hello")
    subprocess.run([PYTHON, "-c", code], env=env, check=True, timeout=30)


def test_cluster_facade_in_primary():
    code = (
        "from clusterkit import cluster\n"
        "assert cluster.is_primary and cluster.is_master and not cluster.is_worker\n"
        "assert cluster.worker is None\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERKIT_WORKER_ID"}
    subprocess.run([PYTHON, "-c", code], env=env, check=True, timeout=30)


def test_notify_is_a_noop_outside_systemd(monkeypatch):
    from clusterkit import notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False and notify.watchdog() is False


def test_notify_sends_real_datagrams(monkeypatch, notify_socket):
    from clusterkit import notify
    from clusterkit.worker import Worker

    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    w = Worker({})
    assert w.ready("up") is True
    w.ready()  # idempotent: no second READY=1
    w.status("busy\nreally")
    w.stopping()
    assert notify.watchdog() is True
    notify_socket.wait_for("WATCHDOG=1")
    lines = notify_socket.assignments()
    assert lines.count("READY=1") == 1
    assert "STATUS=up" in lines and "STATUS=busy really" in lines and "STOPPING=1" in lines
