"""The request limits and timeouts every clusterkit serving path applies.

:func:`clusterkit.serve.serve_asyncio` enforces all of them; ``serve_asgi``
passes uvicorn the ones it has as settings and applies the rest as middleware
(:mod:`clusterkit.asgilimits`); ``serve_wsgi`` passes the ones waitress has (see
the README, "Limits and timeouts"). :class:`RequestBuffer` is the one
worker-wide bound, ``max_request_buffer``, that the first two share.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from math import inf


def check_seconds(what: str, value: object) -> None:
    """Refuse a timeout that is not a number of seconds above 0 (ValueError naming *what*):
    0 would make a ticker spin, NaN or infinity would stop it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < inf:
        raise ValueError(f"{what} must be seconds above 0, not {value!r}")


#: the Limits fields checked to be seconds above 0, and whole numbers above 0
_TIMEOUTS = ("header_timeout", "body_timeout", "keep_alive_timeout", "send_timeout")
_SIZES = (
    "max_request_line",
    "max_header_fields",
    "max_header_field_size",
    "max_head_size",
    "max_body_size",
    "max_pipelined",
)


@dataclass(frozen=True)
class Limits:
    """What one connection may send; defaults follow gunicorn's and uvicorn's."""

    #: bytes in the request target (gunicorn's limit_request_line is 4094 for the whole line)
    max_request_line: int = 8190
    #: header fields per request (gunicorn's limit_request_fields)
    max_header_fields: int = 100
    #: bytes in one header field, name and value (gunicorn's limit_request_field_size)
    max_header_field_size: int = 8190
    #: bytes in a whole request head: request line and header fields (431; nginx: 32 KiB)
    max_head_size: int = 64 * 1024
    #: bytes in a request body, which is buffered whole (nginx's client_max_body_size: 1m)
    max_body_size: int = 1024 * 1024
    #: bytes of requests (heads and bodies) one worker holds while they arrive, summed over
    #: its connections; a request that would go past it gets 503. Without it, one client
    #: sending a head or body just under its limit on each of many connections grows the
    #: worker by all of them. Default (None): 16 MiB, or one largest request if larger.
    max_request_buffer: int | None = None
    #: requests a connection may send ahead while one is being answered (pipelining): the
    #: parser reads a whole read's worth at once, thousands of small requests, and each
    #: waiting one is kept; past this many the next gets 503, after those, and the
    #: connection closes
    max_pipelined: int = 32
    #: seconds from a request's first byte (or the connection's start) to its complete head
    header_timeout: float = 10.0
    #: seconds a request body may go without receiving a byte
    body_timeout: float = 30.0
    #: seconds an idle keep-alive connection is kept (uvicorn's timeout_keep_alive), from
    #: when its last response is (nearly) all sent
    keep_alive_timeout: float = 5.0
    #: seconds a response may go without the client taking a byte of it (nginx's
    #: send_timeout); then the connection is dropped, and what it held with it. A client
    #: that keeps taking it is never cut, however long the response takes
    send_timeout: float = 30.0
    #: connections one worker holds (serve_asyncio); a new one past it closes the oldest
    #: connection that has no response in progress (idle, or a request still arriving),
    #: else the oldest whose client is a write buffer behind on its response, so a client
    #: holding connections open cannot lock others out. Default (None): the
    #: worker's open-file limit (``LimitNOFILE=``) less 64 descriptors for everything else
    max_connections: int | None = None

    def __post_init__(self) -> None:
        for name in _TIMEOUTS:
            check_seconds(f"Limits: {name}", getattr(self, name))
        for name in _SIZES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits: {name} must be a whole number above 0, not {value!r}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(
                f"Limits: max_connections must be at least 1, not {self.max_connections}"
            )
        largest = self.max_head_size + self.max_body_size
        if self.max_request_buffer is None:  # frozen: set through object
            object.__setattr__(self, "max_request_buffer", max(16 * 1024 * 1024, largest))
        elif self.max_request_buffer < largest:
            raise ValueError(
                f"Limits: max_request_buffer ({self.max_request_buffer}) is smaller than one "
                f"largest request, max_head_size + max_body_size ({largest}); raise it too"
            )

    @property
    def tick(self) -> float:
        """How often timeouts are checked: they fire up to this late."""
        return min(1.0, *(getattr(self, name) / 4 for name in _TIMEOUTS))


class CountedWarning:
    """A warning about what can happen thousands of times a second under attack (a request
    refused, a connection closed): logged with a count, at once and then at most once a
    second (:meth:`count`), and whatever is still uncounted when the server calls
    :meth:`flush` (at least once a second: its tick). *message* takes the count as its
    one ``%d``."""

    def __init__(self, logger: logging.Logger, message: str) -> None:
        self.logger = logger
        self.message = message
        self.unlogged = 0  # since the last line
        self.logged_at = 0.0  # time.monotonic() of the last line

    def count(self) -> None:
        self.unlogged += 1
        if time.monotonic() - self.logged_at >= 1.0:
            self.flush()

    def flush(self) -> None:
        """Log what is not logged yet, if anything."""
        if self.unlogged:
            self.logger.warning(self.message, self.unlogged)
            self.unlogged = 0
            self.logged_at = time.monotonic()


def connections_shed(logger: logging.Logger, limit: str, remedy: str) -> CountedWarning:
    """The warning of a worker that closes its oldest connection with no response in
    progress (else its oldest slow reader) when it holds *limit* (e.g.
    ``max_connections (64)``), so that one client holding that many cannot lock every
    other client out; *remedy* says how to raise it."""
    return CountedWarning(
        logger,
        "closed %d connection(s) to make room (the oldest with no response in progress, else "
        f"the oldest whose client was slow to read): this worker holds {limit}; {remedy} if "
        "that is legitimate load",
    )


class RequestBuffer:
    """The bytes of requests one worker holds while they arrive, shared by all its
    connections, against ``limits.max_request_buffer``; what a server refuses past it
    is logged with a count, at once and then at most once a second (:meth:`refused`),
    and whatever is still uncounted when the server calls :meth:`warn`."""

    def __init__(self, limits: Limits, logger: logging.Logger) -> None:
        self.cap: int = limits.max_request_buffer  # type: ignore[assignment]
        self.held = 0
        self.refusals = CountedWarning(
            logger,
            f"refused %d request(s) with 503: this worker held max_request_buffer ({self.cap} "
            "bytes) of requests arriving; raise Limits.max_request_buffer if that is "
            "legitimate load",
        )

    def take(self, n: int) -> bool:
        """Count *n* more bytes held; False if the worker now holds more than the cap."""
        self.held += n
        return self.held <= self.cap

    def give(self, n: int) -> None:
        """*n* bytes are no longer held."""
        self.held -= n

    def refused(self) -> None:
        """A request was refused (503) for the cap."""
        self.refusals.count()

    def warn(self) -> None:
        """Log the refusals not logged yet, if any."""
        self.refusals.flush()
