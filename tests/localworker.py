"""Workers run as local processes with sockets passed the way systemd passes them.

``systemd-socket-activate`` (from the systemd package) binds the port, waits
for the first connection and execs the worker with fd 3, ``LISTEN_FDS``,
``LISTEN_PID`` and ``LISTEN_FDNAMES``, as PID 1 does. A unix datagram socket
bound by the test stands in for ``NOTIFY_SOCKET``. Where a test needs the
socket to outlive a worker (PID 1 keeps it open), the test itself holds it and
passes it as fd 3 through a tiny launcher that sets LISTEN_PID and execs.

Used by test_worker.py and test_serve.py; their fixtures (``procs``,
``app_script``, ``notify_socket``) are in conftest.py.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
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
# STATUS=slow / STATUS=hang: the test sees a request reach its handler (NOTIFY_SOCKET)
mark = w.status

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
            mark("slow")
            await asyncio.sleep(float(os.environ.get("CK_SLOW", "0.3")))
        elif req.path == "/hang":
            mark("hang")
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
            mark("slow")
            await asyncio.sleep(float(os.environ.get("CK_SLOW", "0.3")))
        elif path == "/hang":
            mark("hang")
            time.sleep(60)
        elif path == "/info":
            body = info().encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})
    http = {"http": os.environ["CK_HTTP"]} if os.environ.get("CK_HTTP") else {}
    serve_asgi(app, address, drain_timeout=float(os.environ.get("CK_DRAIN", "10")),
               log_level="warning", **http)
elif mode == "wsgi":
    from clusterkit.serve import serve_wsgi
    def app(environ, start_response):
        path = environ["PATH_INFO"]
        body = b"Hello Http"
        if path == "/slow":
            mark("slow")
            time.sleep(float(os.environ.get("CK_SLOW", "0.3")))
        elif path == "/hang":
            mark("hang")
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

    def count(self, line: str) -> int:
        return self.assignments().count(line)

    def after(self, line: str) -> list[str]:
        """The assignments received after the first *line* (datagrams keep their order)."""
        lines = self.assignments()
        return lines[lines.index(line) + 1 :] if line in lines else []

    def wait_for_quiet(self, line: str, quiet: float, timeout: float = 10.0) -> int:
        """Wait until no *line* came for *quiet* seconds; return how many came in all."""
        deadline = time.monotonic() + timeout
        while True:
            times = self.times(line)
            if not times or time.monotonic() - times[-1] > quiet:
                return len(times)
            if time.monotonic() > deadline:
                raise AssertionError(f"{line!r} still coming after {timeout}s")
            time.sleep(0.02)

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


def ignore_errors(f, *a, **kw) -> None:
    """Call f, ignoring any exception (for requests a test expects to hang or fail)."""
    try:
        f(*a, **kw)
    except Exception:  # noqa: BLE001
        pass
