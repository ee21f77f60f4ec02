"""uvicorn's HTTP protocols with the limits uvicorn has no setting for, below the app.

:func:`clusterkit.serve.serve_asgi` runs one of these; what can be refused once a
request head is whole is :mod:`clusterkit.asgilimits`' middleware.

- both: at ``limit_concurrency`` connections uvicorn answers every new request 503;
  a new connection past it closes the oldest one with no response in progress (else
  drops the oldest whose client is a write buffer behind on its response). And
  ``send_timeout``: a response the client stops taking is dropped, not kept for ever.
- :func:`guarded_h11`: h11 bounds a head itself (``h11_max_incomplete_event_size``);
  this adds ``header_timeout`` and ``body_timeout``.
- :func:`guarded_httptools`: uvicorn's httptools protocol buffers a head or trailer
  field without end, keeps a silent, half-sent or stalled connection for ever,
  answers a malformed request ahead of the responses still owed before it, puts
  trailer fields among the app's headers, and queues every pipelined request of a
  read (2.6 MiB of them for 256 KiB sent). This bounds what a request holds beyond
  its body (``max_head_size``, 431), adds ``header_timeout`` (408, or a plain close
  if not a byte came) and ``body_timeout`` (408 unless the app has begun its
  response), holds a refusal until the responses before it are sent, keeps the
  app's headers to the head's, and queues at most ``max_pipelined`` requests behind
  the one being answered (503 after them, and close).

Each relies on uvicorn's own attributes (``cycle``, ``pipeline``, ``flow``,
``connections``, h11's ``trailing_data`` and ``their_state``); tests/test_protocol.py
runs the whole HTTP suite against both.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import Any

from clusterkit.limits import CountedWarning, Limits, connections_shed


def refusal(status: int) -> bytes:
    """A whole response refusing a request with *status*, closing the connection."""
    text = HTTPStatus(status).phrase.encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (status, text, len(text), text)
    )


def upgraded(protocol: Any) -> bool:
    """Whether uvicorn has handed *protocol*'s connection to a websocket protocol: the
    request that upgraded it left the timer armed, and its time is not this one's to keep."""
    return protocol.transport.get_protocol() is not protocol


def end_stalled_body(cycle: Any, transport: Any) -> None:
    """A body that stalled past ``body_timeout``: 408 unless the app has begun its response;
    the app gets http.disconnect and what it sends after is dropped, as when a client goes
    (both of uvicorn's request cycles); the connection closes."""
    if cycle is not None:
        if not cycle.response_started:
            transport.write(refusal(408))
        cycle.disconnected = True
        cycle.message_event.set()
    transport.close()


class _Deadline:
    """One connection's deadline: the loop time by which a whole head, or a body's next
    byte, must come (0: none is awaited), and its one timer, armed again only when it
    fires, not a timer per request. Also _SendWatch's timer and what it last saw unsent."""

    __slots__ = ("deadline", "timer", "refused", "send_timer", "unsent", "dropped")

    def __init__(self) -> None:
        self.deadline = 0.0
        self.timer: Any = None
        self.refused: int | str | None = None  # a refusal: nothing more is awaited
        self.send_timer: Any = None  # while a response waits for the client to take it
        self.unsent = 0  # bytes of it not sent at the last look
        self.dropped = 0  # h11: bytes of body read after the response, to be dropped


def answered(cycle: Any) -> bool:
    """Whether uvicorn's request *cycle* has sent its whole response."""
    return cycle is not None and cycle.response_complete


class _Timed:
    """The timer both guarded protocols keep (a mixin before uvicorn's protocol): what
    happens once the deadline has passed is each protocol's ``deadline_passed``."""

    reading: _Deadline
    loop: Any  # uvicorn's protocol's
    transport: Any
    flow: Any
    cycle: Any

    def arm_timer(self) -> None:
        reading = self.reading
        reading.timer = self.loop.call_at(reading.deadline, self.timer_fired)

    def connection_lost(self, exc: Exception | None) -> None:
        reading = self.reading
        for timer in (reading.timer, reading.send_timer):  # the send timer: _SendWatch's
            if timer is not None:
                timer.cancel()
        reading.timer = reading.send_timer = None
        super().connection_lost(exc)  # type: ignore[misc]  # uvicorn's protocol's

    def timer_fired(self) -> None:
        reading = self.reading
        reading.timer = None
        if (
            not reading.deadline
            or reading.refused is not None
            or self.transport.is_closing()
            or upgraded(self)
        ):
            return  # nothing awaited (armed again when a head begins), or refused
        now = self.loop.time()
        if now < reading.deadline:
            self.arm_timer()  # a later deadline than the one it was armed for
        else:
            self.deadline_passed(now)

    def deadline_passed(self, now: float) -> None:
        raise NotImplementedError

    def body_stalled(self, now: float, body_timeout: float) -> None:
        """No body byte came in time: unless uvicorn itself paused reading (the app is not
        reading what came, or a request is pipelined), the request ends (408)."""
        if self.flow.read_paused:
            self.reading.deadline = now + body_timeout
            self.arm_timer()
        else:
            self.reading.refused = 408  # nothing more is read
            end_stalled_body(self.cycle, self.transport)


class _SendWatch:
    """``send_timeout``, which uvicorn has no setting for: a response the client stops
    taking would be kept for ever, the app's task blocked in ``send()`` (uvicorn's flow
    control) or, once the app is done, the connection closing only when it is all sent.
    A mixin before uvicorn's protocol: when the write buffer passes its high-water mark,
    or a response ends with bytes of it still unsent, a timer looks every
    ``send_timeout`` seconds; if the client took nothing in between, the connection is
    dropped (the app gets ``http.disconnect``), as serve_asyncio does."""

    reading: _Deadline
    loop: Any  # uvicorn's protocol's
    transport: Any
    send_timeout: float  # the guarded class's

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]  # uvicorn's protocol's
        self.watch_send()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.transport.get_write_buffer_size():
            self.watch_send()

    def watch_send(self) -> None:
        reading = self.reading
        if reading.send_timer is None:
            reading.unsent = self.transport.get_write_buffer_size()
            reading.send_timer = self.loop.call_later(self.send_timeout, self.send_looked)

    def send_looked(self) -> None:
        reading = self.reading
        reading.send_timer = None
        unsent = self.transport.get_write_buffer_size()
        if not unsent or upgraded(self):
            return  # all sent: watched again at the next pause or unsent end
        if unsent == reading.unsent:  # nothing taken for send_timeout
            self.transport.abort()
            return
        reading.unsent = unsent
        reading.send_timer = self.loop.call_later(self.send_timeout, self.send_looked)


class _MakesRoom:
    """At ``limit_concurrency`` connections uvicorn answers every new request 503, so one
    client holding that many, silent or half-sent, would lock every other client out
    until they time out. A mixin before uvicorn's protocol: a new connection past the
    limit closes the oldest one with no response in progress instead (else drops the
    oldest slow reader), as serve_asyncio does, and the worker logs how many (at most a
    line a second). ``opened`` is the guarded class's own: its connections, oldest
    first."""

    opened: dict[Any, None]
    shed: CountedWarning | None = None  # the class's, made at the first room made
    connections: Any  # uvicorn's protocol's
    limit_concurrency: Any
    logger: Any

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]  # uvicorn's protocol's
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) > limit - 1:
            self.make_room()
        self.opened[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.opened.pop(self, None)
        super().connection_lost(exc)  # type: ignore[misc]

    def handle_websocket_upgrade(self, *args: Any) -> None:
        # as uvicorn takes it out of its connections: the websocket protocol's from now on
        self.opened.pop(self, None)
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def make_room(self) -> None:
        """Close the oldest connection with no response in progress; failing that, drop
        the oldest whose client is a write buffer behind on a response (such a client
        holds its connection until send_timeout if it takes nothing, for ever if it
        trickles)."""
        for conn in self.opened:
            cycle = conn.cycle
            if (cycle is None or cycle.response_complete) and not getattr(conn, "pipeline", ()):
                self.let_go(conn)
                return
        for conn in self.opened:
            if conn.flow.write_paused:
                self.let_go(conn)
                return

    def let_go(self, conn: Any) -> None:
        transport = conn.transport
        if transport.get_write_buffer_size():  # close() would wait for the client to read
            transport.abort()
        else:
            transport.close()  # a request still arriving is dropped with it
        # counted out now, not when its close completes: uvicorn's 503 test counts
        # connections, and a request on the new one may come first; and out of opened,
        # so that the next new connection does not choose it again
        self.connections.discard(conn)
        self.opened.pop(conn, None)
        self.count_shed()

    def count_shed(self) -> None:
        cls = type(self)
        if cls.shed is None:
            cls.shed = connections_shed(
                self.logger,
                f"limit_concurrency ({self.limit_concurrency})",
                "raise it (serve_asgi(..., limit_concurrency=N))",
            )
        shed = cls.shed
        shed.count()
        if shed.unlogged == 1:  # the first count() did not log: a line for it within a second
            wait = shed.logged_at + 1.0 - time.monotonic()
            self.loop.call_later(max(0.0, wait), shed.flush)  # type: ignore[attr-defined]


def guarded_h11(limits: Limits) -> type:
    """uvicorn's h11 protocol with ``header_timeout`` and ``body_timeout``, which uvicorn has
    no setting for: a connection that has not sent a whole request head that long after it
    opened, or after the first byte of its next request, is closed (with a 408 if it sent
    part of one); a body that goes ``body_timeout`` without a byte gets 408 unless the app
    has begun its response, the app gets ``http.disconnect``, and the connection closes.

    h11's own state says what is awaited (``their_state``); as in :func:`guarded_httptools`,
    one deadline and one timer per connection, armed again only when it fires."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    header_timeout = limits.header_timeout
    body_timeout = limits.body_timeout
    max_body_size = limits.max_body_size

    class GuardedH11Protocol(_MakesRoom, _SendWatch, _Timed, H11Protocol):
        opened: dict[Any, None] = {}  # noqa: RUF012 - this class's connections, oldest first
        send_timeout = limits.send_timeout
        awaited: Any = h11.IDLE  # their_state when the deadline was last set

        def connection_made(self, transport: Any) -> None:
            self.reading = _Deadline()
            super().connection_made(transport)
            self.reading.deadline = self.loop.time() + header_timeout
            self.arm_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            reading = self.reading
            if self.conn.their_state is h11.SEND_BODY and answered(self.cycle):
                # the app answered without reading the body: h11 reads the rest only to
                # drop it, for as long as the client sends; past max_body_size, close
                reading.dropped += len(data)
                if reading.dropped > max_body_size:
                    self.transport.close()
                    return
            else:
                reading.dropped = 0
            self.awaiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start on a pipelined request
            self.awaiting()

        def awaiting(self) -> None:
            """Set the deadline from what h11 awaits of the client now."""
            reading = self.reading
            state = self.conn.their_state
            if state is h11.SEND_BODY:  # a body byte may have come: its stall starts again
                reading.deadline = self.loop.time() + body_timeout
            elif state is h11.IDLE:
                # a head began: after a request (even in the read that ended its body), or
                # on a connection idle since its last response
                began = self.awaited is not state or not reading.deadline
                if began and self.conn.trailing_data[0]:
                    reading.deadline = self.loop.time() + header_timeout
            else:  # the request is whole (answered now), or the connection is done
                reading.deadline = 0.0
            self.awaited = state
            if reading.deadline and reading.timer is None:
                self.arm_timer()

        def deadline_passed(self, now: float) -> None:
            if self.conn.their_state is h11.SEND_BODY:
                self.body_stalled(now, body_timeout)
            else:  # no whole head in time
                if self.conn.trailing_data[0]:  # part of one
                    self.transport.write(refusal(408))
                self.transport.close()

    return GuardedH11Protocol


class TooManyPipelined(Exception):
    """Raised from a parser callback to stop parsing a read: max_pipelined requests wait."""


class _Reading(_Deadline):
    """What guarded_httptools tracks of the request being read, on one connection (one
    attribute of the protocol: past 30 an instance's attributes leave CPython's shared-key
    dict, and every attribute uvicorn reads gets slower)."""

    __slots__ = ("in_message", "in_head", "raw", "body_size", "refusing")

    def __init__(self) -> None:
        super().__init__()
        self.in_message = False  # between a request's first byte and its end
        self.in_head = False  # between a request's first byte and its whole head
        #: bytes received for the request being read, from the read after the one it began in
        self.raw = 0
        self.body_size = 0
        self.refusing: int | None = None  # the status of a refusal a parser callback raised


def guarded_httptools(limits: Limits) -> type:
    """uvicorn's httptools protocol with ``max_head_size``, ``header_timeout``,
    ``body_timeout`` and ``max_pipelined`` applied, refusals in pipelining order, and
    trailer fields kept from the app (module docstring).

    Per request this costs a few attribute writes: the timer is one per connection,
    re-armed only when it fires, not a timer per request."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    header_timeout = limits.header_timeout
    body_timeout = limits.body_timeout
    max_head_size = limits.max_head_size
    max_pipelined = limits.max_pipelined
    max_body_size = limits.max_body_size
    # uvicorn's methods called directly, not through super(): this runs on every request
    base = HttpToolsProtocol

    class GuardedHttpToolsProtocol(_MakesRoom, _SendWatch, _Timed, HttpToolsProtocol):
        opened: dict[Any, None] = {}  # noqa: RUF012 - this class's connections, oldest first
        send_timeout = limits.send_timeout
        reading: _Reading

        def connection_made(self, transport: Any) -> None:
            self.reading = reading = _Reading()
            super().connection_made(transport)
            reading.deadline = self.loop.time() + header_timeout
            self.arm_timer()

        def data_received(self, data: bytes) -> None:
            reading = self.reading
            if reading.refused is not None:
                return
            if reading.in_message:
                reading.raw += len(data)
            elif not reading.deadline:  # a next request begins (or CRLFs before one)
                reading.deadline = self.loop.time() + header_timeout
                if reading.timer is None:
                    self.arm_timer()
            base.data_received(self, data)
            # past its body, a request sends its head, chunk framing and trailer fields,
            # which httptools buffers whole: an endless one ends here
            if (
                reading.in_message
                and reading.raw - reading.body_size > max_head_size + reading.body_size
                and reading.refused is None
            ):
                self.refuse(431)

        def on_message_begin(self) -> None:
            reading = self.reading
            reading.in_message = reading.in_head = True
            reading.raw = reading.body_size = 0
            if not reading.deadline:
                reading.deadline = self.loop.time() + header_timeout
            base.on_message_begin(self)

        def on_headers_complete(self) -> None:
            reading = self.reading
            reading.in_head = False
            reading.deadline = self.loop.time() + body_timeout  # for a body's first byte
            if len(self.pipeline) >= max_pipelined:
                # uvicorn queues every request of a read (thousands; 2.6 MiB a connection
                # in a read of 256 KiB): past max_pipelined, 503 after those and close
                self.logger.warning(
                    "%d pipelined requests already wait on one connection (max_pipelined):"
                    " 503, then the connection closes",
                    max_pipelined,
                )
                reading.refusing = 503
                raise TooManyPipelined  # ends the parse; uvicorn calls send_400_response
            base.on_headers_complete(self)
            # the scope keeps the head's fields; trailer fields go to a copy (uvicorn's
            # upgrade check reads it), never to the app as if a proxy in front set them
            self.headers = self.headers.copy()

        def on_body(self, body: bytes) -> None:
            reading = self.reading
            reading.body_size += len(body)
            reading.deadline = self.loop.time() + body_timeout
            if reading.body_size > max_body_size and answered(self.cycle):
                # the app answered without reading it: uvicorn reads the rest only to drop
                # it, for as long as the client sends (a review: 100 MiB and on)
                if not self.transport.is_closing():
                    self.transport.close()
                return
            base.on_body(self, body)

        def on_message_complete(self) -> None:
            reading = self.reading
            reading.in_message = False
            reading.deadline = 0.0
            base.on_message_complete(self)

        # -- once the deadline has passed: a head's time, a body's stall -------------
        def deadline_passed(self, now: float) -> None:
            reading = self.reading
            if reading.in_head:
                self.refuse(408)
            elif reading.in_message:
                self.body_stalled(now, body_timeout)
            elif self.response_owed():  # no next request yet while one is answered: wait
                reading.deadline = now + header_timeout
                self.arm_timer()
            else:  # nothing of a request came: just close
                self.transport.close()

        # -- refusals, in turn --------------------------------------------------
        def response_owed(self) -> bool:
            """Whether an earlier request's response is still to be sent (pipelining)."""
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete and not cycle.more_body

        def refuse(self, status: int | str) -> None:
            """Answer *status* (a str: uvicorn's 400 with that text) and close, once the
            responses owed before it are sent; nothing more is read."""
            self.reading.refused = status
            if not self.response_owed():
                self.send_refusal(status)
                return
            self.flow.pause_reading()
            cycle = self.cycle  # the last request read: its response is the last one owed
            response_sent = cycle.on_response

            def then_refuse() -> None:
                response_sent()
                if not self.transport.is_closing():
                    self.send_refusal(status)

            cycle.on_response = then_refuse

        def send_refusal(self, status: int | str) -> None:
            if isinstance(status, str):
                base.send_400_response(self, status)
            else:
                self.transport.write(refusal(status))
                self.transport.close()

        def send_400_response(self, msg: str) -> None:  # uvicorn's, for a parse error
            self.refuse(self.reading.refusing or msg)

    return GuardedHttpToolsProtocol
