"""Each serving path (asyncio, ASGI/uvicorn, WSGI/waitress) as a real worker.

Sockets come from systemd-socket-activate, or, where the socket must outlive a
worker as it does under PID 1, from the test itself (see localworker.py).
"""

from __future__ import annotations

import os
import socket
import threading

import pytest
from localworker import (
    PYTHON,
    ignore_errors,
    needs_activate,
    request,
    start_activated,
    unit_env,
    with_socket_as_fd3,
)
from scenario import holds_for, wait_for

MODES = ["asyncio", "asgi", "wsgi"]


@needs_activate
@pytest.mark.parametrize("mode", MODES)
def test_path_serves_then_stops_gracefully(mode, procs, app_script, notify_socket):
    p, port = start_activated(procs, app_script, mode, notify_socket)
    notify_socket.wait_for("READY=1")
    status, headers, body = request(port, "/info")
    assert status == 200 and b'"fd": 3' in body and b'"activated": true' in body
    p.terminate()
    assert p.wait() == 0
    lines = notify_socket.assignments()
    assert lines.count("READY=1") == 1
    assert lines.index("STOPPING=1") > lines.index("READY=1")


@needs_activate
@pytest.mark.parametrize("mode", MODES)
def test_path_drains_in_flight_requests(mode, procs, app_script, notify_socket):
    p, port = start_activated(procs, app_script, mode, notify_socket, CK_SLOW="0.8")
    notify_socket.wait_for("READY=1")
    results: list[object] = []

    def slow() -> None:
        try:
            results.append(request(port, "/slow")[0])
        except Exception as e:  # noqa: BLE001
            results.append(e)

    threads = [threading.Thread(target=slow) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for("3 requests in their handler", lambda: notify_socket.count("STATUS=slow") == 3)
    p.terminate()
    for t in threads:
        t.join(10)
    assert results == [200] * 3
    assert p.wait() == 0


@needs_activate
@pytest.mark.parametrize("mode", MODES)
def test_path_stops_watchdog_pings_when_hung(mode, procs, app_script, notify_socket):
    # wsgi: one app thread; a hung request plus a queued one means no progress
    p, port = start_activated(
        procs, app_script, mode, notify_socket, WATCHDOG_USEC="400000", CK_THREADS="1"
    )
    wait_for("3 watchdog pings", lambda: len(notify_socket.times("WATCHDOG=1")) >= 3)
    for _ in range(2):
        threading.Thread(
            target=ignore_errors, args=(request, port, "/hang"), kwargs={"timeout": 4}, daemon=True
        ).start()
        notify_socket.wait_for("STATUS=hang")  # the second one waits behind the first
    # a healthy worker pings every 0.2 s: 0.6 s without one means the pings stopped
    before = notify_socket.wait_for_quiet("WATCHDOG=1", quiet=0.6)
    holds_for(
        "no more pings while hung",
        lambda: len(notify_socket.times("WATCHDOG=1")) == before,
        1.2,
    )


@needs_activate
@pytest.mark.parametrize("fast", [True, False], ids=["uvloop", "asyncio-loop"])
def test_asyncio_keepalive_and_connection_close(fast, procs, app_script, notify_socket):
    import http.client

    extra = {} if fast else {"CK_NO_UVLOOP": "1"}
    _, port = start_activated(procs, app_script, "asyncio", notify_socket, **extra)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/info")
        info = conn.getresponse()
        assert (b'"uvloop": true' in info.read()) is fast
        sock = conn.sock
        for _ in range(3):  # keep-alive: same connection
            conn.request("POST", "/echo", body=b"hi")
            resp = conn.getresponse()
            assert resp.read() == b"POST hi" and resp.getheader("Connection") is None
            assert conn.sock is sock
        # Connection: close is honoured: the response says so and the server closes
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):  # ends only when the server closes
                data += chunk
        assert b"\r\nConnection: close\r\n" in data and data.endswith(b"Hello Http")
        # pipelining: two requests in one write, two responses in order
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(
                b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.count(b"HTTP/1.1 200 OK") == 2 and data.endswith(b"Hello Http")
    finally:
        conn.close()


def _mode(mode: str) -> tuple[str, dict[str, str]]:
    """The app script's mode and environment: "asgi-httptools" is serve_asgi on
    uvicorn's httptools protocol instead of h11."""
    if mode == "asgi-httptools":
        return "asgi", {"CK_HTTP": "httptools"}
    return mode, {}


@pytest.mark.parametrize("keepalive", [False, True], ids=["new-connections", "keep-alive"])
@pytest.mark.parametrize("mode", [*MODES, "asgi-httptools"])
def test_rolling_sigterm_under_load_loses_nothing(
    mode, keepalive, procs, app_script, notify_socket
):
    """Shared mode as PID 1 runs it: the test holds the socket (O_NONBLOCK, as with
    NonBlocking=yes), two workers accept on it, one gets SIGTERM under load. With
    keep-alive, each client reuses its connection until the server says close."""
    import http.client

    mode, extra = _mode(mode)
    listener = socket.create_server(("127.0.0.1", 0), backlog=socket.SOMAXCONN)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    workers = []
    for worker_id in (0, 1):
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="http", CK_SLOW="0.05", **extra)
        env.update(unit_env(notify_socket, worker_id=worker_id))
        env.pop("WATCHDOG_USEC", None)
        argv = [PYTHON, str(app_script), mode, str(port)]
        p = with_socket_as_fd3(listener, argv, env=env)  # as PID 1 passes it
        procs.append(p)
        workers.append(p)
    wait_for("both workers READY=1", lambda: notify_socket.count("READY=1") == 2, timeout=15)

    failures: list[object] = []
    ok = [0]
    stop = threading.Event()

    def client() -> None:
        n = 0
        # http.client reopens a connection the server closed with "Connection: close";
        # a reused connection reset under a request is a failure.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.is_set() and n < 2000:
            n += 1
            path = "/slow" if n % 3 == 0 else "/"
            try:
                if keepalive:
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    status, _ = resp.status, resp.read()
                else:
                    status, _, _ = request(port, path)
                if status == 200:
                    ok[0] += 1
                else:
                    failures.append(status)
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))
                conn.close()
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for("requests served by both", lambda: ok[0] > 20)
        workers[0].terminate()
        assert workers[0].wait() == 0
        served_before = ok[0]
        wait_for("the survivor to go on serving", lambda: ok[0] > served_before + 20)
    finally:
        stop.set()
        for t in threads:
            t.join(20)
        listener.close()
    assert failures == []
    assert ok[0] > served_before > 20
    assert "STOPPING=1" in notify_socket.assignments()


@needs_activate
@pytest.mark.parametrize("mode", [*MODES, "asgi-httptools"])
def test_keepalive_connection_idle_at_sigterm_gets_one_more_request(
    mode, procs, app_script, notify_socket
):
    # A client reusing a keep-alive connection races with the drain: closing
    # the idle connection at once would reset its next request.
    import http.client

    mode, extra = _mode(mode)
    p, port = start_activated(procs, app_script, mode, notify_socket, **extra)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"Hello Http"
        p.terminate()
        notify_socket.wait_for("STOPPING=1")
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"Hello Http")
        assert resp.getheader("Connection") == "close"
    finally:
        conn.close()
    assert p.wait(15) == 0


FORWARDED_APP = r"""
import sys
from clusterkit.serve import serve_asgi, serve_wsgi

mode, trusted = sys.argv[1], sys.argv[2]

async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"{scope['client'][0]} {scope['scheme']}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

def wsgi(environ, start_response):
    body = f"{environ['REMOTE_ADDR']} {environ['wsgi.url_scheme']}".encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]

def plain(req):  # serve_asyncio trusts nothing: the app reads the peer and the field
    return f"{req.client[0]} {req.header('x-forwarded-for')}"

if mode == "asyncio":
    from clusterkit.serve import serve_asyncio
    serve_asyncio(plain, 3000)
elif mode == "asgi":
    serve_asgi(asgi, 3000, forwarded_allow_ips=trusted)
else:
    serve_wsgi(wsgi, 3000, trusted_proxy=trusted,
               trusted_proxy_headers={"x-forwarded-for", "x-forwarded-proto"})
"""


@pytest.mark.parametrize(
    ("mode", "trusted", "seen"),
    [
        ("asgi", "127.0.0.2,::ffff:127.0.0.2", "198.18.0.77 https"),
        ("asgi", "127.0.0.2", "::ffff:127.0.0.2 http"),  # the socket is IPv6: not trusted
        ("wsgi", "::ffff:127.0.0.2", "198.18.0.77 https"),
        ("wsgi", "127.0.0.2", "::ffff:127.0.0.2 http"),
        ("asyncio", "-", "::ffff:127.0.0.2 198.18.0.77"),
    ],
)
def test_the_proxys_address_as_the_dual_stack_socket_sees_it(
    mode, trusted, seen, procs, tmp_path, notify_socket
):
    """README, "HAProxy settings, and why": behind HAProxy the server must trust its
    X-Forwarded-For/-Proto from HAProxy's address only. systemd's socket for a bare port
    is IPv6 and takes IPv4 too, so an IPv4 peer shows as ::ffff:a.b.c.d: that is the form
    to trust (with the plain one, uvicorn and waitress ignore the fields). serve_asyncio
    gives the app the peer as ``req.client``. The "proxy" here connects from 127.0.0.2,
    another address of the loopback."""
    script = tmp_path / "forwarded.py"
    script.write_text(FORWARDED_APP)
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)  # as ListenStream=PORT
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="http")
    env.update(unit_env(notify_socket))
    procs.append(with_socket_as_fd3(listener, [PYTHON, str(script), mode, trusted], env=env))
    wait_for("READY=1", lambda: notify_socket.count("READY=1") == 1, timeout=15)
    with socket.socket() as c:
        c.bind(("127.0.0.2", 0))
        c.connect(("127.0.0.1", port))
        c.sendall(
            b"GET / HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 198.18.0.77\r\n"
            b"X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n"
        )
        reply = c.makefile("rb").read()
    assert reply.split(b"\r\n\r\n", 1)[1].decode() == seen, reply
