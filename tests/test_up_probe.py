"""What ``clusterkit up`` does with the app's answer to GET /: root reads it, the app wrote it.

Each case plays a hostile app on a loopback socket (no container needed): ``up``'s probe
must come back, having read a bounded part of the answer, and show it escaped.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from clusterkit import up
from clusterkit.spec import Listen

App = Callable[[socket.socket], None]


@pytest.fixture
def app() -> Iterator[Callable[[App], tuple[int, dict[str, int]]]]:
    """Serve one connection with the given function; yields (port, what it saw)."""
    listener = socket.create_server(("127.0.0.1", 0))
    threads: list[threading.Thread] = []

    def serve(answer: App) -> tuple[int, dict[str, int]]:
        seen = {"sent": 0, "closed": 0}

        def run() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                try:
                    answer(conn)
                except OSError:  # the probe hung up: what the endless cases wait for
                    seen["closed"] = 1

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return listener.getsockname()[1], seen

    yield serve
    listener.close()
    for thread in threads:
        thread.join(timeout=30)


def test_the_apps_reason_phrase_is_shown_escaped(app) -> None:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 404 Gone\x1b]52;c;eA==\x07\r\nContent-Length: 0\r\n\r\n")

    port, _ = app(answer)
    assert up._probe("127.0.0.1", port) == "404 Gone\\x1b]52;c;eA==\\x07 ''"


def test_an_endless_body_is_read_only_as_far_as_shown(app) -> None:
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"1000\r\n" + b"\x1b[2J" * 1024 + b"\r\n"
        for _ in range(100_000):  # 400 MiB, if the probe read it all
            conn.sendall(chunk)
            seen["sent"] += 1

    port, seen = app(answer)
    shown = up._probe("127.0.0.1", port)
    assert shown.startswith("200 OK '\\x1b[2J\\x1b[2J"), shown
    assert shown.isprintable()
    assert wait_for_hang_up(seen)
    assert seen["sent"] < 1000  # what the socket buffers held when the probe hung up


DRIPS = {
    "status-line": (
        b"HTTP/1.1 2",
        "nothing usable (no answer within 1 s); the workers are ready, check the app",
    ),
    "header-line": (b"HTTP/1.1 200 OK\r\nX: ", "200 OK '' (cut off after 1 s)"),
    "body": (b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n", "200 OK 'xxxxxxxxxx"),
}


@pytest.mark.parametrize("where", DRIPS)
def test_an_answer_dripped_a_byte_at_a_time_is_cut_off(app, monkeypatch, where: str) -> None:
    monkeypatch.setattr(up, "PROBE_SECONDS", 1)
    start, expected = DRIPS[where]

    def answer(conn: socket.socket) -> None:
        conn.sendall(start)
        while True:  # an answer that never ends, each byte well within the timeout
            conn.sendall(b"x")
            time.sleep(0.02)

    port, seen = app(answer)
    shown = up._probe("127.0.0.1", port)
    assert shown.startswith(expected), shown
    assert shown.endswith(expected if where == "status-line" else "(cut off after 1 s)")
    assert wait_for_hang_up(seen)


def wait_for_hang_up(seen: dict[str, int]) -> bool:
    """Whether the app's sending failed (the probe hung up) within 5 s."""
    for _ in range(100):
        if seen["closed"]:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    "garbage",
    [b"\x1b[2J\r\n\r\n", b"HTTP/1.1 99999 \r\n\r\n", b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200],
    ids=["not-http", "bad-status", "too-many-fields"],
)
def test_an_answer_that_is_not_http_is_said_so(app, garbage: bytes) -> None:
    def answer(conn: socket.socket) -> None:
        conn.sendall(garbage)

    port, _ = app(answer)
    shown = up._probe("127.0.0.1", port)
    assert shown.startswith("nothing usable (") and shown.isprintable(), shown
    assert "\x1b" not in shown


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("127.0.0.1:80", "127.0.0.1"),
        ("0.0.0.0:80", "127.0.0.1"),
        ("[::]:80", "::1"),
        ("[::1]:80", "::1"),
        ("198.18.0.77:80", "198.18.0.77"),
    ],
)
def test_the_probe_goes_where_the_cluster_listens(address: str, host: str) -> None:
    assert up._probe_host(Listen(address, 80)) == host
