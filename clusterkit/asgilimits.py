"""The limits uvicorn has no setting for, applied to an ASGI app as middleware.

:func:`clusterkit.serve.serve_asgi` gives uvicorn what it can enforce itself (a
request head still arriving, ``h11_max_incomplete_event_size``; idle keep-alive;
``limit_concurrency``). uvicorn has no limit on the request target, the header
fields or the body: it hands them to the app, and a body is streamed to an app
that, as most frameworks do, reads it whole. :class:`LimitedApp` applies the rest
of :class:`clusterkit.limits.Limits` between uvicorn and the app:

- before the app runs: a request target over ``max_request_line`` gets 414, more
  than ``max_header_fields`` header fields or one over ``max_header_field_size``
  431, a ``Content-Length`` over ``max_body_size`` 413, an HTTP version other
  than 1.0/1.1 (h11 answers 0.9, 2.0 and 3.0 request lines) 505, a missing or
  repeated ``Host`` 400 (h11 refuses those itself, httptools does not);
- while the app reads the body: past ``max_body_size``, or past
  ``max_request_buffer`` of body bytes read by all the requests in progress in
  this worker (an app keeps what it reads until it returns), the client gets 413
  (503) if the app has not begun its response, and the app gets
  ``http.disconnect`` (a client gone), so it stops and uvicorn stops reading.

Every refusal says ``Connection: close``, and uvicorn then closes the connection.

What must be bounded before a head is whole (its size, the time it takes) is
:mod:`clusterkit.asgiprotocols`' (uvicorn's protocols, guarded).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from http import HTTPStatus
from typing import Any

from clusterkit.limits import Limits, RequestBuffer

_DISCONNECT = {"type": "http.disconnect"}


async def _refuse(send: Any, status: int) -> None:
    body = HTTPStatus(status).phrase.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class LimitedApp:
    """ASGI middleware: *app*, with *limits* applied to each HTTP request it gets."""

    def __init__(self, app: Any, limits: Limits, logger: logging.Logger) -> None:
        self.app = app
        self.limits = limits
        #: body bytes read by the requests in progress (capped by limits.max_request_buffer)
        self.buffer = RequestBuffer(limits, logger)

    def check(self, scope: Any) -> tuple[int | None, bool]:
        """The status that refuses this request before the app sees it (or None), and
        whether it has a body (Content-Length other than 0, or Transfer-Encoding)."""
        limits = self.limits
        if scope.get("http_version") not in ("1.0", "1.1"):
            return 505, False
        if scope["method"] == "CONNECT":  # a tunnel: see httpserver._other_method
            return 400, False
        target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if target > limits.max_request_line:
            return 414, False
        headers = scope["headers"]
        if len(headers) > limits.max_header_fields:
            return 431, False
        has_body = upgrade = False
        hosts = 0
        for name, value in headers:
            if len(name) + len(value) > limits.max_header_field_size:
                return 431, False
            if name == b"content-length":
                if value.isdigit() and int(value) > limits.max_body_size:
                    return 413, False
                has_body = has_body or value.strip(b"0") != b""
            elif name == b"transfer-encoding":
                has_body = True
            elif name == b"host":
                hosts += 1
            elif name == b"connection" and b"upgrade" in value.lower():
                upgrade = True  # with an Upgrade field: httptools switches protocols
        if hosts > 1 or (not hosts and scope["http_version"] == "1.1"):
            return 400, False  # RFC 9112, 3.2 (h11 refuses these itself; httptools does not)
        if upgrade and has_body:  # llhttp hands the body over as the new protocol's bytes:
            return 400, False  # uvicorn would pass the app the request without its body
        return None, has_body

    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        # Not a coroutine function: the server awaits what this returns, and a request
        # without a body (most of them) gets the app's own coroutine, no layer of ours.
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        status, has_body = self.check(scope)
        if status is not None:
            return _refuse(send, status)
        if not has_body:  # nothing to count: the app as it is, no wrapper on its path
            return self.app(scope, receive, send)
        return self._counted(scope, receive, send)

    async def _counted(self, scope: Any, receive: Any, send: Any) -> None:
        """The app, with the body it reads counted against the limits."""
        limits, buffer = self.limits, self.buffer
        held = 0  # of buffer.held, this request's
        started = refused = False

        async def receive_limited() -> Any:
            nonlocal held, refused
            if refused:
                return _DISCONNECT
            message = await receive()
            if message["type"] == "http.request":
                n = len(message.get("body", b""))
                held += n
                within = buffer.take(n)
                if held > limits.max_body_size:
                    status = 413
                elif not within:
                    status = 503
                    buffer.refused()
                else:
                    return message
                refused = True
                if not started:
                    await _refuse(send, status)
                return _DISCONNECT
            return message

        async def send_unless_refused(message: Any) -> None:
            nonlocal started
            if refused:  # the 413 (or the cut) was the answer; what the app says next is not
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            return await self.app(scope, receive_limited, send_unless_refused)
        finally:
            buffer.give(held)
