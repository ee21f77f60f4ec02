"""The one HTTP/1.1 client of the benchmark and the tests (plain sockets, no pytest, no retries).

``bench/client.py`` (the benchmark's loads, with per-worker attribution) and
``tests/scenario.py`` (the container tests' bounded load) both send their requests
through :class:`Conn` and name every failure with :func:`classify`, so a failed
request means the same thing in a test and in ``bench/RESULTS.md``. Threads reach a
server in a container with a private network by :func:`join_netns` first.

Outcomes: ``ok``, ``refused``, ``reset`` (the connection closed or was reset before the
response was complete), ``timeout``, ``non-2xx``, ``bad-response``, ``error``.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable

OK, REFUSED, RESET, TIMEOUT, NON_2XX, BAD_RESPONSE, ERROR = (
    "ok",
    "refused",
    "reset",
    "timeout",
    "non-2xx",
    "bad-response",
    "error",
)

_CLONE_NEWNET = 0x40000000


def join_netns(pid: int | None) -> None:
    """Move the calling *thread* into the network namespace of process ``pid`` (None: stay)."""
    if pid is None:
        return
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            os.setns(fd, _CLONE_NEWNET)
        elif ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns(net of {pid}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(netns_pid: int | None, fn: Callable[[], object]) -> object:
    """Run ``fn`` in a fresh thread that joined ``netns_pid``'s network namespace; its result."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            join_netns(netns_pid)
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name="http1-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("result")


class BadResponse(Exception):
    """The server sent something that is not an HTTP/1.x response."""


def request_bytes(host: str, path: str = "/", keepalive: bool = True) -> bytes:
    conn = "keep-alive" if keepalive else "close"
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n\r\n".encode()


class Conn:
    """One client connection: send a GET, read exactly one whole response."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host, self.port = host, port
        self.buf = b""
        self.requests = 0  # responses asked for on this connection

    def request(
        self, host: str | None = None, path: str = "/", keepalive: bool = True
    ) -> tuple[int, dict[str, str], bytes, bool]:
        """Send one GET, read the whole response: (status, headers, body, server keeps it open)."""
        self.send(request_bytes(host or self.host, path, keepalive))
        return self.read_response()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self) -> tuple[int, dict[str, str], bytes, bool]:
        self.requests += 1
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            raise BadResponse(lines[0][:80]) from None
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._chunked()
        elif "content-length" in headers:
            length = int(headers["content-length"])
            while len(self.buf) < length:
                self._fill()
            body, self.buf = self.buf[:length], self.buf[length:]
        else:  # read to EOF
            try:
                while True:
                    self._fill()
            except EOFError:
                body, self.buf = self.buf, b""
            return status, headers, body, False
        closes = headers.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0")
        return status, headers, body, not closes

    def _chunked(self) -> bytes:
        """Read a chunked body (trailers ignored)."""
        body = b""
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            size_line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(self.buf) < size + 2:
                self._fill()
            body, self.buf = body + self.buf[:size], self.buf[size + 2 :]
            if size == 0:
                return body

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed before the response was complete")
        self.buf += data

    def close(self) -> None:
        self.sock.close()


def classify(exc: BaseException) -> str:
    """The outcome a failed request is counted as."""
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, EOFError)):
        return RESET
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since 3.10
        return TIMEOUT
    if isinstance(exc, BadResponse):
        return BAD_RESPONSE
    return ERROR
