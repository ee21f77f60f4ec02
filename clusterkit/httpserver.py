"""A small, fast HTTP/1.1 server protocol for asyncio (Node's ``http.createServer``).

Parsing is httptools' (llhttp, Node's own parser) when installed, else a
minimal pure-Python parser (no chunked request bodies: 501). Keep-alive and
pipelining are supported, ``Connection: close`` is honoured, responses carry
``Content-Length`` and ``Date``.

A handler takes a :class:`Request` and returns ``bytes``/``str`` (200,
text/plain), a :class:`Response`, or an awaitable of either::

    def hello(req): return "Hello Http"

Draining (graceful stop) is driven by :class:`ConnectionSet`: after
:meth:`ConnectionSet.drain` every response says ``Connection: close``, and a
connection with no request in progress gets ``fresh_grace`` seconds to send
one before it is closed. Closing it at once would race with the client: a
request sent on a reused keep-alive connection, or on one accepted just
before SIGTERM, would meet a reset (seen: 4-7 failed requests per rolling
reload under load; none with the grace).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus

try:  # the `fast` extra
    import httptools

    HttpParserError: type[Exception] = httptools.HttpParserError
except ImportError:  # pragma: no cover - plain asyncio fallback
    httptools = None
    HttpParserError = ValueError


class Request:
    __slots__ = ("method", "target", "headers", "body", "version")

    def __init__(self, method: str, target: str, headers: list, body: bytes, version: str):
        self.method = method
        #: the request target as sent, e.g. ``/path?q=1``
        self.target = target
        #: ``[(name_lower, value), ...]`` as str (latin-1)
        self.headers: list[tuple[str, str]] = headers
        self.body = body
        self.version = version

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(
        self,
        body: bytes | str = b"",
        status: int = 200,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.body = body.encode() if isinstance(body, str) else body
        self.status = status
        self.headers = headers if headers is not None else [("Content-Type", TEXT)]


TEXT = "text/plain; charset=utf-8"
Result = bytes | str | Response
Handler = Callable[[Request], Result | Awaitable[Result]]

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_PLAIN_200 = b"HTTP/1.1 200 OK\r\nContent-Type: " + TEXT.encode() + b"\r\nContent-Length: "


class ConnectionSet:
    """State shared by the connections of one server: handler, Date, drain."""

    def __init__(self, handler: Handler, logger, fresh_grace: float = 1.0) -> None:
        self.handler = handler
        self.logger = logger
        self.fresh_grace = fresh_grace
        self.connections: set[HttpProtocol] = set()
        self.draining = False
        self.date = b""
        self.tick()

    def tick(self) -> None:
        """Refresh the cached Date header (call once a second)."""
        self.date = b"\r\nDate: " + formatdate(time.time(), usegmt=True).encode()

    def drain(self) -> None:
        """Start the graceful stop: close what is idle, mark the rest to close."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_if_idle()

    def protocol(self) -> HttpProtocol:
        return HttpProtocol(self)


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "state",
        "transport",
        "parser",
        "url",
        "headers",
        "body",
        "in_message",
        "busy",
        "pending",
        "served",
        "closing",
    )

    def __init__(self, state: ConnectionSet) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self) if httptools else _SimpleParser(self)
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.in_message = False
        self.busy = False
        self.pending: deque[tuple[Request, bool]] = deque()
        self.served = 0
        self.closing = False

    # -- transport events --------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.state.connections.add(self)
        if self.state.draining:  # accepted in the same loop turn as the drain began
            asyncio.get_running_loop().call_later(self.state.fresh_grace, self.close_if_idle, True)

    def connection_lost(self, exc) -> None:
        self.state.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            self._error(400, b"Bad Request")
        except Exception:  # httptools' HttpParserUpgrade and friends
            self._error(501, b"Not Implemented")

    # -- parser callbacks --------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_message = True
        self.url = b""
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        p = self.parser
        req = Request(
            p.get_method().decode(),
            self.url.decode("latin-1"),
            self.headers,
            b"".join(self.body),
            p.get_http_version(),
        )
        keep = p.should_keep_alive()
        if self.busy:
            self.pending.append((req, keep))
        else:
            self._dispatch(req, keep)

    # -- requests ----------------------------------------------------------
    def _dispatch(self, req: Request, keep: bool) -> None:
        try:
            result = self.state.handler(req)
        except Exception:
            self.state.logger.exception("handler failed: %s %s", req.method, req.target)
            result = Response(b"Internal Server Error", 500)
        if isinstance(result, (bytes, str, Response)):
            self._respond(result, keep)
        else:
            self.busy = True
            task = asyncio.ensure_future(result)
            task.add_done_callback(lambda t: self._done(t, req, keep))

    def _done(self, task: asyncio.Future, req: Request, keep: bool) -> None:
        self.busy = False
        if task.cancelled():
            result: Result = Response(b"Service Unavailable", 503)
        elif task.exception() is not None:
            self.state.logger.error(
                "handler failed: %s %s", req.method, req.target, exc_info=task.exception()
            )
            result = Response(b"Internal Server Error", 500)
        else:
            result = task.result()
        self._respond(result, keep)
        while self.pending and not self.busy and self.transport is not None:
            self._dispatch(*self.pending.popleft())

    def _respond(self, result: Result, keep: bool) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        close = not keep or self.state.draining
        if isinstance(result, str):
            result = result.encode()
        if isinstance(result, bytes):
            head = _PLAIN_200 + str(len(result)).encode() + self.state.date
        else:
            lines = [b"HTTP/1.1 %d %s" % (result.status, _REASONS.get(result.status, b"Unknown"))]
            for k, v in result.headers:
                lines.append(f"{k}: {v}".encode("latin-1"))
            lines.append(b"Content-Length: %d" % len(result.body))
            head = b"\r\n".join(lines) + self.state.date
            result = result.body
        if close:
            transport.write(head + b"\r\nConnection: close\r\n\r\n" + result)
            self.closing = True
            transport.close()
        else:
            transport.write(head + b"\r\n\r\n" + result)
        self.served += 1

    def _error(self, status: int, text: bytes) -> None:
        if self.transport is not None and not self.closing:
            self._respond(Response(text, status), keep=False)

    def close_if_idle(self, grace_over: bool = False) -> None:
        """Close if idle once ``fresh_grace`` is over; a request in the meantime is served."""
        if self.transport is None or self.closing:
            return
        if self.busy or self.pending or self.in_message:
            return  # its response will carry Connection: close
        if grace_over:
            self.closing = True
            self.transport.close()
        else:
            loop = asyncio.get_running_loop()
            loop.call_later(self.state.fresh_grace, self.close_if_idle, True)


class _SimpleParser:
    """The subset of httptools.HttpRequestParser that HttpProtocol uses, in Python."""

    def __init__(self, proto: HttpProtocol) -> None:
        self.proto = proto
        self.buf = b""
        self.method = b""
        self.version = "1.1"
        self.keep = True

    def get_method(self) -> bytes:
        return self.method

    def get_http_version(self) -> str:
        return self.version

    def should_keep_alive(self) -> bool:
        return self.keep

    def feed_data(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    raise ValueError("header too large")
                if self.buf:
                    self.proto.in_message = True
                return
            lines = self.buf[:end].split(b"\r\n")
            try:
                method, target, version = lines[0].split(b" ")
            except ValueError:
                raise ValueError("bad request line") from None
            if not version.startswith(b"HTTP/1."):
                raise ValueError("bad version")
            headers = []
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if not sep:
                    raise ValueError("bad header")
                headers.append((name.strip().lower(), value.strip()))
            hd = dict(headers)
            if b"chunked" in hd.get(b"transfer-encoding", b"").lower():
                raise NotImplementedError("chunked request body")
            length = int(hd.get(b"content-length", b"0"))
            if len(self.buf) < end + 4 + length:
                self.proto.in_message = True
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self.method = method
            self.version = version[5:].decode()
            conn = hd.get(b"connection", b"").lower()
            self.keep = conn == b"keep-alive" if self.version == "1.0" else conn != b"close"
            p = self.proto
            p.on_message_begin()
            p.on_url(target)
            for name, value in headers:
                p.on_header(name, value)
            if body:
                p.on_body(body)
            p.on_message_complete()
