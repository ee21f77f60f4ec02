"""A small, fast HTTP/1.1 server protocol for asyncio (Node's ``http.createServer``).

Parsing is httptools' (llhttp, Node's own parser): the ``fast`` extra. HTTP/1.1 keep-alive
and pipelining are supported, ``Connection: close`` is honoured, responses carry
``Content-Length`` and ``Date``.

A handler takes a :class:`Request` and returns ``bytes``/``str`` (200,
text/plain), a :class:`Response`, or an awaitable of either::

    def hello(req): return "Hello Http"

Hostile clients meet :class:`Limits`: a too-long request target gets 414, too
many or too large header fields 431, a too-large body 413 (before it is read
when ``Content-Length`` says so), a malformed request 400, then the connection
closes. What one worker holds of requests still arriving is capped by
``max_request_buffer``, summed over its connections: a request that would go
past it gets 503 (many connections each sending a head or body just under its
limit would otherwise grow the worker by all of them). A request read whole in
one read costs nothing here: only what stays held between reads is counted.
Trailer fields of a chunked body are dropped, and count as part of the head.
A request's head must arrive within ``header_timeout`` (counted from the first
byte of its target: until then the connection is idle), a body must not stall
for ``body_timeout``, an idle keep-alive connection closes after
``keep_alive_timeout`` (counted from when its last response has gone), and a
connection whose client takes nothing of a response for ``send_timeout`` is dropped,
while one that keeps taking it is never cut. A worker holds at most
``max_connections``: past it, a new connection closes the oldest one that has no
response in progress, else drops the oldest whose client is a write buffer (64 KiB)
behind on its response (a client holding connections open would otherwise lock every
other client out). A pipelined request waits, read but not answered, while the one
before it is answered or the client is a write buffer behind on its response (at most
``max_pipelined`` wait, then 503); reading pauses meanwhile, so neither requests nor
responses pile up. What a request holds of ``max_request_buffer`` is given back when
it is answered. A handler that
raises, returns something other than bytes/str/Response, or sets a header
whose name is no token or whose value holds CR/LF or another control character
but tab gets a 500 and a log record naming it; nothing it set is sent.

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
import resource
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from clusterkit import responsefields
from clusterkit.limits import Limits, RequestBuffer, connections_shed

try:  # the `fast` extra
    import httptools
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "clusterkit's HTTP server (serve_asyncio) needs httptools: "
        "pip install 'clusterkit-systemd[fast]'"
    ) from e

__all__ = ["ConnectionSet", "HttpProtocol", "Limits", "Request", "Response"]

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: float) -> bytes:
    """RFC 9110 IMF-fixdate, e.g. ``Sun, 06 Nov 1994 08:49:37 GMT``. Not email.utils.formatdate:
    importing the email package costs each worker 1.2 MiB."""
    t = time.gmtime(seconds)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    ).encode()


class Request:
    # HttpProtocol.on_message_complete sets each of these itself, without __init__
    __slots__ = ("method", "target", "raw_headers", "_headers", "body", "version", "client")

    def __init__(
        self,
        method: str,
        target: str,
        raw_headers: list,
        body: bytes,
        version: str,
        client: tuple | None = None,
    ) -> None:
        self.method = method
        #: the request target as sent, e.g. ``/path?q=1``
        self.target = target
        #: ``[(name_lower, value), ...]`` as bytes, as received
        self.raw_headers: list[tuple[bytes, bytes]] = raw_headers
        self._headers: list[tuple[str, str]] | None = None
        self.body = body
        self.version = version
        #: the peer's address as the socket sees it, ``(host, port)`` (Node's
        #: ``req.socket.remoteAddress``); on systemd's IPv6 socket an IPv4 peer is
        #: ``::ffff:a.b.c.d``. Behind a proxy it is the proxy's: trust its X-Forwarded-For
        #: only when it is.
        self.client = client

    @property
    def headers(self) -> list[tuple[str, str]]:
        """``[(name_lower, value), ...]`` as str (latin-1); decoded on first use, since most
        handlers never look (decoding every request's fields cost 10% of a hello world)."""
        if self._headers is None:
            self._headers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers
            ]
        return self._headers

    @property
    def path(self) -> str:
        path = self.target.partition("?")[0]
        if path[:1] != "/" and "://" in path:  # absolute-form (RFC 9112, 3.2.2), as to a proxy
            path = "/" + path.partition("://")[2].partition("/")[2]
        return path

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default


#: a Request without its __init__ (HttpProtocol sets every field itself)
_new_request = object.__new__


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
_RESULTS = (bytes, str, Response)
Handler = Callable[[Request], Result | Awaitable[Result]]

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_PLAIN_200 = b"HTTP/1.1 200 OK\r\nContent-Type: " + TEXT.encode() + b"\r\nContent-Length: "
#: the head of a text/plain 200 by body length, for the lengths an app answers most
_PLAIN_200_HEADS: dict[int, bytes] = {}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: what ends a response head after Date: keep the connection, or close it
_END = b"\r\n\r\n"
_END_CLOSE = b"\r\nConnection: close\r\n\r\n"
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
#: response headers clusterkit writes itself; an app's own are dropped (one Content-Length)
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "date"})


def _open_file_cap() -> int:
    """Connections a worker can hold: its open-file limit, less 64 descriptors for the
    listening socket, the event loop, logs and the app's own files."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(soft - 64, 16)


def _plain_200_head(length: int) -> bytes:
    head = _PLAIN_200 + b"%d" % length
    if len(_PLAIN_200_HEADS) < 256:  # bounded: the lengths are the app's to choose
        _PLAIN_200_HEADS[length] = head
    return head


def _other_method(method: bytes) -> str:
    """A method not in _METHODS, as str; CONNECT is refused: this is an origin server, and a
    2xx answer opens a tunnel to a proxy in front (HAProxy), which then passes the client's
    later bytes through untouched, forged X-Forwarded-For and all."""
    if method == b"CONNECT":
        raise _Reject(400)
    return method.decode()


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request's fields say a body follows: Transfer-Encoding, or a
    Content-Length other than 0."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0")):
            return True
    return False


class _Stop(Exception):
    """Raised from on_message_complete: the connection closes after this request, so the
    parser reads no further (a pipelined request behind it must not run, RFC 9112, 9.6)."""


class _Reject(Exception):
    """Raised from a parser callback: answer *status* and close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _BadResult(Exception):
    pass


class ConnectionSet:
    """State shared by the connections of one server: handler, limits, Date, drain."""

    def __init__(
        self, handler: Handler, logger, fresh_grace: float = 1.0, limits: Limits | None = None
    ) -> None:
        self.handler = handler
        self.logger = logger
        self.fresh_grace = fresh_grace
        self.limits = limits or Limits()
        #: open connections, oldest first (a dict keeps insertion order)
        self.connections: dict[HttpProtocol, None] = {}
        self.max_connections = self.limits.max_connections or _open_file_cap()
        self.shed = connections_shed(
            logger,
            f"max_connections ({self.max_connections})",
            "raise LimitNOFILE= or Limits.max_connections",
        )
        self.draining = False
        #: bytes of requests held by all connections (capped by limits.max_request_buffer)
        self.buffer = RequestBuffer(self.limits, logger)
        self.date = b""
        self.now = 0.0
        self.tick()

    def tick(self) -> None:
        """Refresh the cached Date header and clock, close timed-out connections."""
        self.date = b"\r\nDate: " + http_date(time.time())
        self.date_end = self.date + _END
        self.now = now = time.monotonic()
        # when each timeout ends if it starts now: the same for every start until the next
        # tick (a request sets two or three; adding them up each time cost 2% of a request)
        limits = self.limits
        self.header_deadline = now + limits.header_timeout
        self.body_deadline = now + limits.body_timeout
        self.keep_alive_deadline = now + limits.keep_alive_timeout
        self.send_deadline = now + limits.send_timeout
        self.buffer.warn()
        self.shed.flush()
        for conn in list(self.connections):
            if conn.deadline and now >= conn.deadline:
                conn.timed_out(now)

    def start_ticking(self, loop: asyncio.AbstractEventLoop) -> None:
        """Call :meth:`tick` every ``limits.tick`` seconds from *loop*."""

        def again() -> None:
            self.tick()
            loop.call_later(self.limits.tick, again)

        loop.call_later(self.limits.tick, again)

    def make_room(self) -> None:
        """At max_connections: close the oldest connection with no response in progress;
        failing that, drop the oldest whose client is behind on a response: a write buffer
        behind, or closing with part of its last one unsent (one that takes nothing would
        hold it until send_timeout, one that trickles for ever, and so many of them would
        lock every other client out)."""
        for conn in self.connections:
            if conn.close_waiting(503):
                self.shed.count()
                return
        for conn in self.connections:
            if conn.drop_if_behind():
                self.shed.count()
                return

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
        "limits",
        "transport",
        "client",
        "parser",
        "url",
        "headers",
        "body",
        "body_size",
        "held",
        "counted",
        "raw",
        "first_read",
        "head_parsed",
        "in_head",
        "in_message",
        "expect_continue",
        "has_host",
        "has_connection",
        "busy",
        "pending",
        "closing",
        "stopped",
        "deadline",
        "write_paused",
        "unsent",
        "half_closed",
    )

    def __init__(self, state: ConnectionSet) -> None:
        self.state = state
        self.limits = state.limits
        self.transport: asyncio.Transport | None = None
        self.client: tuple | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()  # one buffer: a piece each was 9x the size of 5-byte chunks
        self.body_size = 0
        #: bytes counted in state.buffer: each request's until it is answered (or the
        #: connection is gone)
        self.held = 0
        self.counted = 0  # of them, the request being read
        #: bytes received for the request being read, from the read after the one it began in
        self.raw = 0
        self.first_read = 0  # bytes of the read it began in, once it spans reads
        self.head_parsed = 0  # bytes of request line and fields parsed
        self.in_head = False
        self.in_message = False
        self.expect_continue = False
        self.has_host = False
        self.busy = False
        #: requests read whole but not answered yet, with whether to keep the connection
        #: after each and the bytes each holds in state.buffer (or a refusal's status)
        self.pending: deque[tuple[Request | int, bool, int]] = deque()
        self.closing = False
        self.stopped = False  # no more requests are parsed (an error or an upgrade)
        #: monotonic time at which the connection times out; 0: no timeout running
        self.deadline = state.header_deadline
        self.write_paused = False
        #: bytes of responses the client had not taken at the last look (-1: no look yet)
        self.unsent = -1
        self.half_closed = False  # the client sent its last byte: close after what it is owed

    # -- transport events --------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = tuple(peer[:2]) if isinstance(peer, tuple) else None  # not a unix socket
        connections = self.state.connections
        if len(connections) >= self.state.max_connections:
            self.state.make_room()
        connections[self] = None
        if self.state.draining:  # accepted in the same loop turn as the drain began
            asyncio.get_running_loop().call_later(self.state.fresh_grace, self.close_if_idle, True)

    def connection_lost(self, exc) -> None:
        self.state.connections.pop(self, None)
        self.transport = None
        self.deadline = 0.0
        self._release()

    def eof_received(self) -> bool:
        """The client sent all it will (shutdown(SHUT_WR), as ``curl`` with ``--no-buffer``
        and HTTP/1.0 clients may): what it asked is still answered, then the connection
        closes. True keeps the transport open for those responses."""
        self._stop_reading()
        self.half_closed = True
        return bool(self.busy or self.pending)

    def data_received(self, data: bytes) -> None:
        if self.stopped or self.closing:
            return
        if self.in_message:
            self.raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # As uvicorn without a websocket library: the request is answered as
            # if it had no Upgrade header, then the connection closes.
            self._stop_reading()
            return
        except httptools.HttpParserCallbackError as e:
            reject = e.__context__
            if isinstance(reject, _Stop):
                return
            if not isinstance(reject, _Reject):
                self.state.logger.error("HTTP server error", exc_info=reject or e)
                reject = _Reject(500)
            self._reject(reject.status)
            return
        except httptools.HttpParserError:
            self._reject(400)
            return
        if self.in_message:  # a request spans reads: what it holds counts for the worker
            if self.first_read < 0:  # it began in this read, which is counted whole: the
                self.first_read = len(data)  # parser holds what it has of a field not yet whole
            # past its body, a request sends its head, chunk framing and trailer fields: an
            # endless head or trailer field (which the parser buffers whole) ends here
            if self.raw - self.body_size > self.limits.max_head_size + self.body_size:
                self._reject(431)
                return
            self._hold()

    def pause_writing(self) -> None:
        """The client is 64 KiB behind: stop reading too, and look at what it takes every
        ``send_timeout`` (from now, not from the end of keep-alive's timer)."""
        self.write_paused = True
        transport = self.transport
        if transport is not None:
            transport.pause_reading()
            self.unsent = transport.get_write_buffer_size()
            self.deadline = self.state.send_deadline

    def resume_writing(self) -> None:
        self.write_paused = False
        self.unsent = -1
        if not (self.closing or self.busy or self.pending or self.in_message):
            # the response is (nearly) out: the connection is idle from now on
            self.deadline = self.state.keep_alive_deadline
        self._answer_waiting()

    def _maybe_resume_reading(self) -> None:
        if (
            self.transport is not None
            and not self.write_paused
            and not self.pending
            and not self.stopped
            and not self.closing
        ):
            self.transport.resume_reading()

    def _stop_reading(self) -> None:
        self.stopped = True
        if self.transport is not None:
            self.transport.pause_reading()

    # -- parser callbacks --------------------------------------------------
    def on_url(self, url: bytes) -> None:
        if self.in_message:
            self.url += url
            self.head_parsed += len(url)
        else:  # a request begins: set up here, not in on_message_begin (one call from C fewer)
            self.in_message = self.in_head = True
            self.raw = self.counted = self.body_size = 0
            self.first_read = -1  # in this read: data_received counts it if the request spans
            self.url = url
            self.head_parsed = len(url)
            self.headers = []  # self.body is empty here: emptied when a request completes
            self.expect_continue = self.has_host = self.has_connection = False
            if not self.busy:
                self.deadline = self.state.header_deadline
        if len(self.url) > self.limits.max_request_line:
            raise _Reject(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:  # a trailer field of a chunked body: dropped, as uvicorn does, so
            # it cannot pose as a header (one a proxy in front set, say) to the app; llhttp
            # still heeds a Connection trailer, so keep-alive is decided the exact way
            self.has_connection = True
            return
        limits = self.limits
        size = len(name) + len(value)
        self.head_parsed += size + 4
        if (
            size > limits.max_header_field_size
            or self.head_parsed > limits.max_head_size
            or len(self.headers) >= limits.max_header_fields
        ):
            raise _Reject(431)
        name = name.lower()
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise _Reject(400) from None
            if length > limits.max_body_size:
                raise _Reject(413)
        elif name == b"host":
            if self.has_host:  # RFC 9112, 3.2: two Host lines are a 400, never a guess
                raise _Reject(400)
            self.has_host = True
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True
        elif name == b"connection" or name == b"proxy-connection":  # llhttp heeds both
            self.has_connection = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        if not self.has_host and self.parser.get_http_version() == "1.1":
            raise _Reject(400)  # RFC 9112, 3.2: a server MUST answer 400
        if not self.busy:
            self.deadline = self.state.body_deadline
            if (
                self.expect_continue
                and not self.pending
                and self.transport is not None
                and self.parser.get_http_version() == "1.1"  # RFC 9110, 10.1.1: 1.0 knows no 100
            ):
                # the body is read (and buffered) anyway: ask for it at once
                self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.limits.max_body_size:  # chunked: no Content-Length to check
            raise _Reject(413)
        self.body += body
        if not self.busy:
            self.deadline = self.state.body_deadline

    def on_message_complete(self) -> None:
        self.in_message = False
        if not self.write_paused:  # else the send watch of the response before it runs on
            self.deadline = 0.0
        p = self.parser
        keep = p.should_keep_alive()
        if keep and not self.has_connection:
            # llhttp keeps alive without a (Proxy-)Connection field only HTTP/1.1; and
            # get_http_version() formats a str: 0.3 us, a tenth of this module's time per request
            version = "1.1"
        else:
            version = p.get_http_version()
            if version != "1.1" and version != "1.0":  # llhttp also parses 0.9 and 2.0
                raise _Reject(505)
            # HTTP/1.0 keep-alive is not offered (as uvicorn): the connection closes
            keep = keep and version == "1.1"
        if self.has_connection and p.should_upgrade():
            # llhttp upgrades on Connection: upgrade, or for CONNECT, which is refused below
            keep = False
            if _declares_body(self.headers):
                # llhttp hands an upgrade's body over as the new protocol's bytes: the app
                # would get the request (a POST, say) without its body
                raise _Reject(400)
        method = p.get_method()
        body = b""
        if self.body:
            body = bytes(self.body)
            self.body = bytearray()  # the copy is the one kept (until the response is sent)
        # Request's fields set here rather than through its __init__: calling a class with
        # a Python __init__ cost 3% of a request (a C call back into the interpreter)
        req = _new_request(Request)
        req.method = _METHODS.get(method) or _other_method(method)
        req.target = self.url.decode("latin-1")
        req.raw_headers = self.headers
        req._headers = None
        req.body = body
        req.version = version
        req.client = self.client
        held = self.counted  # bytes this request holds, given back once it is answered
        if self.busy or self.write_paused:
            # behind a response in progress, or one the client is slow to take: answering
            # now would pile up responses (a read of pipelined requests makes thousands)
            if len(self.pending) >= self.limits.max_pipelined:
                raise _Reject(503)  # answered after the ones waiting, then the connection closes
            self.pending.append((req, keep, held))
            if self.transport is not None:
                self.transport.pause_reading()
        else:
            self._serve(req, keep, held)
        if not keep or self.closing:  # the connection ends with this request's response
            self._stop_reading()
            raise _Stop

    # -- requests ----------------------------------------------------------
    def _answer_waiting(self) -> None:
        """Answer what waited in ``pending``, in order, until a handler runs or the client
        falls behind again; then, if neither, read on."""
        pending = self.pending
        while (
            pending
            and not (self.busy or self.write_paused or self.closing)
            and self.transport is not None
        ):
            req, keep, held = pending.popleft()
            if isinstance(req, int):  # a refusal that waited its turn
                self._send_error(req)
            else:  # the client half-closed: close after the last one it is owed
                self._serve(req, keep and not (self.half_closed and not pending), held)
        if self.busy or self.write_paused:
            return
        self._maybe_resume_reading()
        if self.in_message:  # the next request began meanwhile: its timer starts now
            state = self.state
            self.deadline = state.header_deadline if self.in_head else state.body_deadline

    def _serve(self, req: Request, keep: bool, held: int) -> None:
        try:
            result = self.state.handler(req)
        except Exception:
            self.state.logger.exception("handler failed: %s %s", req.method, req.target)
            result = Response(b"Internal Server Error", 500)
        if isinstance(result, _RESULTS):
            self._respond(req, result, keep, held)
        elif asyncio.iscoroutine(result) or asyncio.isfuture(result):
            self.busy = True
            task = asyncio.ensure_future(result)
            task.add_done_callback(lambda t: self._done(t, req, keep, held))
        else:
            self._respond(req, result, keep, held)  # refused there, with a log record

    def _done(self, task: asyncio.Future, req: Request, keep: bool, held: int) -> None:
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
        # the client half-closed: close after the last response it is owed
        self._respond(req, result, keep and not (self.half_closed and not self.pending), held)
        self._answer_waiting()

    def _head(self, req: Request, result: Result) -> tuple[bytes, bytes, bool]:
        """For a result other than bytes/str: the response head (without Date and the final
        CRLFs), its body, and whether the app said close."""
        if not isinstance(result, Response):
            raise _BadResult(f"returned {type(result).__name__}, not bytes, str or Response")
        status, body = result.status, result.body
        if type(status) is not int or not 200 <= status <= 599:
            raise _BadResult(f"returned a Response with status {status!r}")
        if not isinstance(body, bytes):
            raise _BadResult(f"returned a Response with a {type(body).__name__} body")
        lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Unknown"))]
        close = False
        for k, v in result.headers:
            if not isinstance(k, str) or not isinstance(v, str):
                raise _BadResult(f"returned a header that is not a str pair: {k!r}")
            if responsefields.forbidden(k, v):
                raise _BadResult(f"returned a header with a forbidden character: {k!r}")
            lk = k.lower()
            if lk in _OWN_HEADERS:
                if lk == "connection" and v.lower() == "close":
                    close = True
                continue
            lines.append(f"{k}: {v}".encode("latin-1"))
        if status in (204, 304):  # no body, and no Content-Length for one (RFC 9110)
            body = b""
        else:
            lines.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join(lines), body, close

    def _hold(self) -> None:
        """Count what the request being read holds so far; 503 past max_request_buffer."""
        # raw is the reads after the one the request began in (first_read, counted whole:
        # a field not yet whole is in it, held by the parser; head_parsed misses that)
        n = max(self.first_read + self.raw, self.head_parsed + self.body_size) - self.counted
        if n <= 0:
            return
        self.counted += n
        self.held += n
        buffer = self.state.buffer
        if not buffer.take(n):
            buffer.refused()
            self._reject(503)

    def _release(self) -> None:
        """Give this connection's counted bytes back to the worker's budget."""
        self.state.buffer.give(self.held)
        self.held = self.counted = 0

    def _respond(self, req: Request, result: Result, keep: bool, held: int = 0) -> None:
        """Write the response to *req*; *held*: the bytes it held in state.buffer."""
        transport = self.transport
        if transport is None or self.closing:
            return  # what it held goes back with the connection's
        if held:
            self.held -= held
            self.state.buffer.give(held)
        if not isinstance(result, bytes) and isinstance(result, str):
            try:
                result = result.encode()
            except UnicodeEncodeError as e:  # a lone surrogate, say: the app's mistake
                self.state.logger.error("handler for %s %s %s", req.method, req.target, e)
                result = Response(b"Internal Server Error", 500)
        if isinstance(result, bytes):  # text/plain, 200: the common case, without a call
            body, app_close = result, False
            size = len(body)
            head = _PLAIN_200_HEADS.get(size) or _plain_200_head(size)
        else:
            try:
                head, body, app_close = self._head(req, result)
            except Exception as e:  # noqa: BLE001 - the app's mistake: 500, logged
                self.state.logger.error("handler for %s %s %s", req.method, req.target, e)
                head, body, app_close = self._head(req, Response(b"Internal Server Error", 500))
            size = len(body)
        if req.method == "HEAD":
            body, size = b"", 0
        state = self.state
        close = not keep or app_close or state.draining
        if not close and not self.busy and not self.in_message and not self.pending:
            # idle from now on; set before the write, which calls pause_writing (and so
            # starts the send watch instead) if the client is slow to take the response
            self.deadline = state.keep_alive_deadline
            self.unsent = -1
        if size > 65536:  # a literal, not a constant: no global lookup per request
            # written apart from its head, the transport keeps the app's bytes: joined,
            # each client slow to take it would hold a copy (one body every response shares)
            transport.write(head + (state.date + _END_CLOSE if close else state.date_end))
            transport.write(body)
            if close:
                self._close()
        elif close:
            transport.write(b"".join((head, state.date, _END_CLOSE, body)))
            self._close()
        else:  # two concatenations cost less than building a tuple to join
            transport.write(head + state.date_end + body)

    # -- refusals and closing ---------------------------------------------
    def _reject(self, status: int) -> None:
        """Refuse the request being read: answer *status* in turn, then close."""
        self._stop_reading()
        self.in_message = self.in_head = False
        # let go of what it sent now: many refused in one loop turn must not add up
        self.url, self.headers, self.body = b"", [], bytearray()
        if self.busy or self.pending:
            self.pending.append((status, False, 0))
        else:
            self._send_error(status)

    def _send_error(self, status: int) -> None:
        if self.transport is None or self.closing:
            return
        text = _REASONS.get(status, b"Error")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d%s\r\nConnection: close\r\n\r\n%s"
            % (status, text, len(text), self.state.date, text)
        )
        self._close()

    def _close(self) -> None:
        self.closing = True
        self.stopped = True  # no request after this one is read
        self.deadline = 0.0
        transport = self.transport
        if transport is not None:
            self.unsent = transport.get_write_buffer_size()
            if self.unsent:  # what the client has not taken yet goes first, while it takes it
                self.deadline = self.state.send_deadline
            transport.close()

    def timed_out(self, now: float) -> None:
        """The ticker found the deadline passed. A response the client is still taking
        (bytes of it unsent, and not as many as at the last look) gets ``send_timeout``
        more, however long it has taken so far; one the client stopped taking is dropped;
        else :meth:`close_waiting` (408)."""
        transport = self.transport
        unsent = transport.get_write_buffer_size() if transport is not None else 0
        if not unsent:
            self.unsent = -1
            if not self.close_waiting(408):  # a response in progress sets the next deadline
                self.deadline = 0.0
        elif unsent != self.unsent:  # the first look, or the client took some since
            self.unsent = unsent
            self.deadline = now + self.limits.send_timeout
        else:  # nothing taken for send_timeout: let go of the connection and what it holds
            self.deadline = 0.0
            self.closing = True
            transport.abort()

    def close_waiting(self, status: int) -> bool:
        """Close the connection unless a response is in progress (then False): the ticker's
        timeouts (408) and make_room (503). A request still arriving is answered *status*.
        What it does not close keeps its deadline (a send watch, say)."""
        transport = self.transport
        if transport is None or self.closing or self.busy or self.pending:
            return False
        if self.in_message:  # slow head or stalled body
            self._send_error(status)
        else:  # idle keep-alive (or a connection that never sent a byte)
            self._close()
        if transport.get_write_buffer_size():  # a client that does not read either
            transport.abort()
        return True

    def drop_if_behind(self) -> bool:
        """make_room's second choice: drop the connection if its client is a write buffer
        behind on a response (pause_writing), or if it is closing with bytes of its last
        response unsent (less than a write buffer: all that keeps it is a client that
        does not take them); True if it was dropped."""
        transport = self.transport
        if transport is None or not (
            self.write_paused or (self.closing and transport.get_write_buffer_size())
        ):
            return False
        self.deadline = 0.0
        self.closing = True
        self.state.connections.pop(self, None)  # counted out now: not chosen twice
        self.transport.abort()
        return True

    def close_if_idle(self, grace_over: bool = False) -> None:
        """Close if idle once ``fresh_grace`` is over; a request in the meantime is served."""
        if self.transport is None or self.closing:
            return
        if self.busy or self.pending or self.in_message:
            return  # its response will carry Connection: close
        if grace_over:
            self._close()
        else:
            loop = asyncio.get_running_loop()
            loop.call_later(self.state.fresh_grace, self.close_if_idle, True)
