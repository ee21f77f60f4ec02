"""One call to serve an app as a clusterkit worker.

Every path does the same life cycle, the one the units expect:

1. ``listen``: the socket systemd passed (or a bound one in development);
2. ``READY=1`` once it accepts;
3. ``WATCHDOG=1`` at half of ``WatchdogSec=``, sent from the serving loop
   itself, so a hung loop stops the pings and systemd kills the worker;
4. SIGTERM (and SIGINT) only set a flag: exiting inside the handler would lose
   a request accepted just before the signal. The loop notices the flag, stops
   accepting, sends ``STOPPING=1``, lets in-flight requests finish (at most
   ``drain_timeout`` seconds: by default the unit's ``--drain-timeout``, passed
   as ``CLUSTERKIT_DRAIN_TIMEOUT``; ``TimeoutStopSec=`` leaves a margin on top),
5. and returns, so the script ends with status 0 (Node's ``exit(worker, 0, null)``).

Paths:

- :func:`serve_asyncio`: clusterkit's own HTTP/1.1 server (httptools, and uvloop
  when installed), the one benchmarked against Node's cluster module.
- :func:`serve_asgi`: uvicorn, in-process, on the passed socket.
- :func:`serve_wsgi`: waitress, in-process, on the passed socket.

Each applies the request limits and timeouts of :class:`clusterkit.limits.Limits`
that its server has (``ASGI_LIMITS``, ``WSGI_LIMITS``; bench/SERVER.md says why);
``serve_asgi`` adds the ones uvicorn lacks as middleware (:mod:`clusterkit.asgilimits`).

Two adapters reach past documented API, pinned in pyproject.toml and checked
by tests/test_server_adapters.py: ``serve_asgi`` extends ``uvicorn.Server``'s
``startup``/``shutdown`` (READY=1 and STOPPING=1 at the right moments) and
imports uvicorn without its command line (:mod:`clusterkit.uvicornimport`);
``serve_wsgi`` drives waitress's loop itself (``server._map``) and reads each
channel's ``requests``, ``request``, ``total_outbufs_len`` and ``last_activity`` to
drain, to make room at ``connection_limit`` (setting ``will_close``, as waitress's own
timeout does, or ``handle_close``) and to free threads waiting on clients.

Running the stock servers unmodified under a clusterkit unit instead:

- ``uvicorn --fd 3 app:app``: uvicorn reads no LISTEN_* and sends no
  ``READY=1``, so the service needs ``Type=exec`` (drop-in: ``[Service]``
  ``Type=exec``) and no ``WatchdogSec=``; exactly one socket must be passed (fd
  3). It treats SIGTERM gracefully but re-raises it at the end, so the exit is
  "killed by SIGTERM", which systemd counts as clean (not ``exit 0``).
  Add ``--timeout-graceful-shutdown N`` below ``TimeoutStopSec=``.
- ``gunicorn app:app --workers 1``: gunicorn (22+, checked in 27.0.1, see
  ``gunicorn/systemd.py``) reads ``LISTEN_FDS``/``LISTEN_PID`` itself and sends
  ``READY=1`` from its arbiter, so ``Type=notify`` with ``NotifyAccess=main``
  works unchanged, and SIGTERM is its graceful stop. Use ``--workers 1``: the
  unit instances are the workers, and gunicorn's own forked workers would be a
  second, nested cluster. ``KillMode=mixed`` suits its arbiter/worker pair. No
  ``WatchdogSec=`` (gunicorn sends no WATCHDOG=1). Bind options are ignored
  when sockets are passed.
"""

from __future__ import annotations

import asyncio
import select
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from clusterkit import responsefields
from clusterkit import worker as worker_mod
from clusterkit.limits import CountedWarning, Limits, check_seconds, connections_shed
from clusterkit.watchdog import Watchdog
from clusterkit.worker import BACKLOG, Address, ThisWorker

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _describe(sock: socket.socket) -> str:
    return worker_mod.bound_to(sock)


def _loop_factory(use_uvloop: bool | None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if use_uvloop is False:
        return None
    try:
        import uvloop
    except ImportError:
        if use_uvloop:
            raise
        return None
    return uvloop.new_event_loop


async def _watchdog_pinger(wd: Watchdog) -> None:
    """Runs as a task in the serving loop: if the loop hangs, the pings stop."""
    assert wd.interval is not None
    while True:
        wd.ping()
        await asyncio.sleep(wd.interval)


class _ListenerWatch:
    """Whether the worker's listening socket still listens: any worker of a shared socket
    can shut it down for all. At start, a socket found shut down is made to listen again,
    clean (worker.listen_again). While serving, it looks every LISTEN_CHECK_EVERY seconds;
    a socket that stopped: a log line, *stop* (the server drains what it has), and
    :meth:`raise_if_gone` ends the worker (75), so that systemd starts it again.

    Why not listen again in place: if the socket's own service (worker 0) exits, PID 1
    finds the socket shut down, fails it and makes a new one on the port as worker 0
    starts again; an old one listening again would take the port from it (EADDRINUSE),
    leaving worker 0 without a socket for as long as the others run. Ended, the others
    drop the old one, and start with what PID 1 holds: the new socket, or the old one (if
    PID 1 never looked), which a starting worker makes listen again."""

    def __init__(self, sock: socket.socket, log: Any, stop: Callable[[], None]) -> None:
        self.sock, self.log, self.stop = sock, log, stop
        self.where = _describe(sock)  # the server closes sock when it stops
        self.gone = False
        self.looked_at = 0.0
        if worker_mod.listen_again(sock):
            log.warning(
                "the listening socket %s had been shut down by a process that holds it "
                "(a worker of this cluster?): listening again",
                self.where,
            )

    def check(self) -> bool:
        """Look (at most every LISTEN_CHECK_EVERY seconds); True once it is gone."""
        now = time.monotonic()
        if self.gone or now < self.looked_at + worker_mod.LISTEN_CHECK_EVERY:
            return self.gone
        self.looked_at = now
        if not worker_mod.listening(self.sock):
            self.gone = True
            self.log.error("%s", worker_mod.ListenerGone(self.where))
            self.stop()
        return self.gone

    async def run(self) -> None:
        """A task in the serving loop."""
        while not self.check():
            await asyncio.sleep(worker_mod.LISTEN_CHECK_EVERY)

    def raise_if_gone(self) -> None:
        if self.gone:
            raise worker_mod.ListenerGone(self.where)


# -- asyncio ------------------------------------------------------------------


def serve_asyncio(
    handler_or_protocol: Any,
    port_or_address: Address = 3000,
    *,
    worker: ThisWorker | None = None,
    drain_timeout: float | None = None,
    fresh_grace: float = 1.0,
    use_uvloop: bool | None = None,
    limits: Limits | None = None,
) -> None:
    """Serve with asyncio until SIGTERM, then drain and return.

    *handler_or_protocol*: a handler ``f(Request) -> bytes | str | Response``
    (or a coroutine function), served by :mod:`clusterkit.httpserver`; or an
    ``asyncio.Protocol`` subclass, served raw (its connections are tracked and
    given ``drain_timeout`` to close themselves). *use_uvloop*: None = if installed.
    *limits*: request size limits and timeouts (:class:`clusterkit.httpserver.Limits`),
    e.g. ``Limits(max_body_size=10 << 20)``; a raw protocol sets its own.
    """
    w = worker or worker_mod.current()
    sock = w.listen(port_or_address)
    drain_timeout = w.drain_timeout if drain_timeout is None else drain_timeout
    with asyncio.Runner(loop_factory=_loop_factory(use_uvloop)) as runner:
        runner.run(_serve_asyncio(w, sock, handler_or_protocol, drain_timeout, fresh_grace, limits))


def _tracked(proto_cls: type, conns: set) -> type:
    class Tracked(proto_cls):  # type: ignore[misc, valid-type]
        def connection_made(self, transport):
            conns.add(self)
            super().connection_made(transport)

        def connection_lost(self, exc):
            conns.discard(self)
            super().connection_lost(exc)

    Tracked.__name__ = proto_cls.__name__
    return Tracked


async def _serve_asyncio(
    w: ThisWorker,
    sock: socket.socket,
    target: Any,
    drain_timeout: float,
    fresh_grace: float,
    limits: Limits | None = None,
) -> None:
    from clusterkit.httpserver import ConnectionSet

    log = w.logger()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)  # runs as a loop callback, not in the handler

    raw = isinstance(target, type) and issubclass(target, asyncio.BaseProtocol)
    if raw:
        conns: set = set()
        factory: Callable[[], asyncio.BaseProtocol] = _tracked(target, conns)
    else:
        state = ConnectionSet(target, log, fresh_grace, limits)
        conns = state.connections  # type: ignore[assignment]
        factory = state.protocol
        state.start_ticking(loop)

    listener = _ListenerWatch(sock, log, stop.set)  # before the server's own listen()
    # backlog: asyncio calls listen() again on the (shared) socket; keep systemd's.
    server = await loop.create_server(factory, sock=sock, backlog=BACKLOG)
    wd = Watchdog()
    pinger = loop.create_task(_watchdog_pinger(wd)) if wd.enabled else None
    watch = loop.create_task(listener.run())
    where = _describe(sock)
    w.ready(f"serving on {where}")
    log.info("worker %d (pid %d) serving on %s", w.id, w.pid, where)

    await stop.wait()
    watch.cancel()  # closing the server closes its socket object: no more looks
    server.close()  # stop accepting; the socket stays open in systemd and other workers
    w.stopping(f"draining {len(conns)} connection(s)")
    log.info("worker %d draining %d connection(s)", w.id, len(conns))
    if not raw:
        state.drain()
    deadline = loop.time() + drain_timeout
    while conns and loop.time() < deadline:
        await asyncio.sleep(0.02)
    for c in list(conns):
        if getattr(c, "transport", None) is not None:
            c.transport.abort()
    if pinger:
        pinger.cancel()
    log.info("worker %d stopped (%d connection(s) cut)", w.id, len(conns))
    listener.raise_if_gone()


# -- ASGI (uvicorn) -------------------------------------------------------------

_LIMITS = Limits()


def _asgi_settings(limits: Limits) -> dict[str, Any]:
    """uvicorn settings for *limits* (README, "Limits and timeouts"). serve_asgi runs the
    protocol *http* names with what uvicorn has no setting for added (_guarded_protocol);
    the request target, header and body limits are clusterkit.asgilimits' middleware."""
    return {
        "http": "auto",  # httptools if installed (uvicorn's choice), guarded either way
        "h11_max_incomplete_event_size": limits.max_head_size,
        "timeout_keep_alive": limits.keep_alive_timeout,
        # a websocket message (where a websocket library is installed), as a request body:
        # uvicorn's default is 16 MiB, and 32 of them may queue on one connection
        "ws_max_size": limits.max_body_size,
        "limit_concurrency": 1000,  # connections + tasks; then 503 (gunicorn's worker_connections)
    }


#: uvicorn settings for the default limits; any can be overridden by passing it to serve_asgi
ASGI_LIMITS: dict[str, Any] = _asgi_settings(_LIMITS)


def _guarded_protocol(http: Any, limits: Limits) -> Any:
    """uvicorn's protocol named by *http* ("auto": httptools if installed, as uvicorn picks),
    guarded by clusterkit.asgiprotocols; a protocol class given is the caller's own."""
    from clusterkit.asgiprotocols import guarded_h11, guarded_httptools

    if http == "auto":
        try:
            import httptools  # noqa: F401 - only whether it is there
        except ImportError:
            http = "h11"
        else:
            http = "httptools"
    if http == "h11":
        return guarded_h11(limits)
    if http == "httptools":
        return guarded_httptools(limits)
    return http


def serve_asgi(
    app: Any,
    port_or_address: Address = 3000,
    *,
    worker: ThisWorker | None = None,
    drain_timeout: float | None = None,
    fresh_grace: float = 1.0,
    limits: Limits | None = None,
    **uvicorn_options: Any,
) -> None:
    """Serve an ASGI app with uvicorn on the worker's socket, then return after a drain.

    uvicorn's own SIGTERM handling is already flag-only (it sets
    ``should_exit``); we add READY=1 after its startup (lifespan included),
    the watchdog task in its loop, STOPPING=1 when its shutdown begins, and a
    harmless handler for the SIGTERM it re-raises at the end, so the exit is 0.
    Connections accepted just before SIGTERM get ``fresh_grace`` seconds to send
    their request (as in the other paths) before uvicorn closes idle ones.
    uvicorn gets the settings for *limits* (default: :data:`ASGI_LIMITS`) unless
    *uvicorn_options* say otherwise, and the app the rest of *limits*
    (:class:`clusterkit.asgilimits.LimitedApp`).
    """
    from clusterkit.asgilimits import LimitedApp
    from clusterkit.uvicornimport import config_and_server

    uvicorn_config, uvicorn_server = config_and_server()

    limits = limits or _LIMITS
    w = worker or worker_mod.current()
    sock = w.listen(port_or_address)
    drain_timeout = w.drain_timeout if drain_timeout is None else drain_timeout
    log = w.logger()
    options: dict[str, Any] = {
        # fresh_grace comes first (see shutdown below): the drain stays within drain_timeout
        "timeout_graceful_shutdown": max(0.1, drain_timeout - fresh_grace),
        "backlog": BACKLOG,
        "lifespan": "auto",
        **_asgi_settings(limits),
    }
    options.update(uvicorn_options)
    options["http"] = _guarded_protocol(options["http"], limits)
    config = uvicorn_config(app, **options)

    class Server(uvicorn_server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            # uvicorn has loaded the app (and its own middleware) by now; the
            # protocols and the lifespan read config.loaded_app after this point.
            self._ck_closing = _CloseWhenDraining(LimitedApp(self.config.loaded_app, limits, log))
            self.config.loaded_app = self._ck_closing
            await super().startup(sockets=sockets)
            if self.started:
                loop = asyncio.get_running_loop()
                wd = Watchdog()
                if wd.enabled:
                    self._ck_pinger = loop.create_task(_watchdog_pinger(wd))
                self._ck_watch = loop.create_task(listener.run())
                w.ready(f"serving on {_describe(sock)}")
                log.info("worker %d (pid %d) serving on %s", w.id, w.pid, _describe(sock))

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            watch = getattr(self, "_ck_watch", None)
            if watch:  # closing the servers closes their socket objects: no more looks
                watch.cancel()
            w.stopping("draining")
            # uvicorn closes a connection with no request in progress at once, which
            # resets a keep-alive client whose next request is on its way (and one
            # accepted just before SIGTERM). Stop accepting; for fresh_grace, answer
            # every request with "Connection: close", so clients leave on their own
            # and reconnect to another worker; then let uvicorn close what is left.
            for server in self.servers:
                server.close()
            self._ck_closing.draining = True
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(fresh_grace, drain_timeout)
            while self.server_state.connections and loop.time() < deadline:
                await asyncio.sleep(0.02)
            await super().shutdown(sockets=sockets)
            pinger = getattr(self, "_ck_pinger", None)
            if pinger:
                pinger.cancel()

    for sig in STOP_SIGNALS:  # what uvicorn restores and re-raises into
        signal.signal(sig, lambda signum, frame: None)
    server = Server(config)
    listener = _ListenerWatch(sock, log, lambda: setattr(server, "should_exit", True))
    server.run(sockets=[sock])
    log.info("worker %d stopped", w.id)
    listener.raise_if_gone()


class _CloseWhenDraining:
    """ASGI middleware: once ``draining`` is set, every HTTP response to a request that
    arrives from then on says ``Connection: close`` (uvicorn's protocols then close after
    it), so a keep-alive client learns to reconnect instead of reusing a connection about
    to close. A request already in progress is answered as it would be; its client's next
    request, within ``fresh_grace``, gets the close."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.draining = False

    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        # Not a coroutine function: until the drain, the app's own coroutine is what the
        # server awaits, with no layer of ours on each request's path.
        if self.draining and scope["type"] == "http":
            return self._closing(scope, receive, send)
        return self.app(scope, receive, send)

    async def _closing(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_closing(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"
                ]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        return await self.app(scope, receive, send_closing)


# -- WSGI (waitress) --------------------------------------------------------------


def lenient_framing(head: bytes) -> str | None:
    """What in a request head (request line and fields, CRLF-separated) waitress would
    read where llhttp, and so serve_asyncio and uvicorn, refuse it, or None. A proxy in
    front may frame such a request otherwise (RFC 9112, 6.1 and 11.2), and waitress went
    on reading the connection after it."""
    line, _, fields = head.partition(b"\r\n")
    if any(byte < 0x20 or byte == 0x7F for byte in line):
        return "a control character in the request line"
    version = line.rpartition(b" ")[2]
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):  # waitress took any, or none (0.9's form)
        return "an HTTP version other than 1.0 and 1.1"
    lines = fields.split(b"\r\n") if fields else []
    if any(field[:1] in (b" ", b"\t") for field in lines):
        return "a folded field line (obs-fold, RFC 9112, 5.2)"
    names = [field.partition(b":")[0].lower() for field in lines]
    if b"transfer-encoding" not in names:
        return None
    if b"content-length" in names:
        return "Content-Length beside Transfer-Encoding (RFC 9112, 6.3)"
    if version != b"HTTP/1.1":
        return "Transfer-Encoding in an HTTP/1.0 request (RFC 9112, 6.1)"
    codings = b",".join(
        f.partition(b":")[2] for f, n in zip(lines, names, strict=True) if n == b"transfer-encoding"
    )
    if [c.strip(b" \t").lower() for c in codings.split(b",")].count(b"chunked") > 1:
        return "chunked more than once (RFC 9112, 7)"
    return None


def drop_stalled_senders(channels: Iterable[Any], send_timeout: float) -> None:
    """Close each waitress channel holding a response its client has taken nothing of for
    *send_timeout* seconds. waitress alone keeps it for ever, with the response (in a
    temporary file past 1 MiB) and a file descriptor: ``channel_timeout`` marks such a
    channel to close, but waitress acts on the mark only when the socket can take data
    again, which it never does; and while the app is still writing, a thread more than
    ``outbuf_high_watermark`` (16 MiB) ahead of the client waits for it. Closing the
    channel wakes that thread (the app's next write raises waitress's ClientDisconnected).
    Small unsent output of an app still running is waitress's to hold, not the client's
    doing: waitress sends it once ``send_bytes`` (18000) have gathered or the app ends."""
    now = time.time()  # waitress's clock for last_activity (a byte sent or received)
    for ch in list(channels):
        if _holds_unsent(ch) and now - ch.last_activity >= send_timeout:
            ch.handle_close()


def _holds_unsent(ch: Any) -> bool:
    """The waitress channel *ch* holds output its client has not taken (see
    drop_stalled_senders for what small unsent output does not count)."""
    unsent = ch.total_outbufs_len
    return bool(unsent) and (not ch.requests or unsent >= ch.adj.send_bytes)


def furthest_behind(channels: Iterable[Any], idle_for: float = 0.0) -> Any | None:
    """The waitress channel among *channels* holding output its client has taken nothing
    of for longest (at least *idle_for* seconds), or None: the one to drop when a slow
    reader must make way. Closing it (``handle_close``) wakes a thread waiting for it."""
    now = time.time()
    behind = [ch for ch in channels if _holds_unsent(ch) and now - ch.last_activity >= idle_for]
    return min(behind, key=lambda ch: ch.last_activity, default=None)


def waiting_on_clients(channels: Iterable[Any]) -> list[Any]:
    """The waitress channels whose task thread waits for its client to take output: an
    app's write blocks while more than ``outbuf_high_watermark`` (16 MiB) is unsent."""
    return [
        ch for ch in channels if ch.requests and ch.total_outbufs_len > ch.adj.outbuf_high_watermark
    ]


#: waitress settings for the baseline; any can be overridden by passing it to serve_wsgi.
#: waitress answers 431 for a large head and 413 for a large body; channel_timeout
#: closes a connection inactive that long (idle keep-alive, or a stalled request).
WSGI_LIMITS: dict[str, Any] = {
    "max_request_header_size": _LIMITS.max_head_size,
    "max_request_body_size": _LIMITS.max_body_size,
    "channel_timeout": int(_LIMITS.keep_alive_timeout),
    "cleanup_interval": 1,
}


def serve_wsgi(
    app: Any,
    port_or_address: Address = 3000,
    *,
    worker: ThisWorker | None = None,
    drain_timeout: float | None = None,
    fresh_grace: float = 1.0,
    threads: int = 8,
    send_timeout: float = _LIMITS.send_timeout,
    **waitress_options: Any,
) -> None:
    """Serve a WSGI app with waitress on the worker's socket, then return after a drain.

    Why waitress: it runs entirely in this process (a thread pool behind one
    select/poll loop) and takes ready-made sockets (``sockets=``), which is
    what a systemd-started worker needs: the pid systemd execs is the one that
    serves, with no fork. gunicorn is production-grade too, but its machinery
    is an arbiter that forks workers; embedding its worker classes without the
    arbiter means relying on its internals. Pure Python, no C build.

    waitress has no graceful stop of its own, so we drive its loop one
    iteration at a time: that gives the watchdog a ping point in the serving
    loop and lets us drain (stop accepting, ``Connection: close`` on every later
    response, close connections left idle for ``fresh_grace``, wait for busy
    ones). The watchdog also stops pinging when requests wait in the queue while no request finished
    during a whole ping interval, unless every thread waits for a client to take a
    response (the loop frees those): a pool of hung app threads cannot hide
    behind a healthy loop. waitress gets :data:`WSGI_LIMITS` unless
    *waitress_options* say otherwise. *send_timeout*: see :func:`drop_stalled_senders`.
    """
    check_seconds("serve_wsgi: send_timeout", send_timeout)
    from waitress import wasyncore
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser, ParsingError
    from waitress.server import create_server
    from waitress.task import WSGITask

    w = worker or worker_mod.current()
    sock = w.listen(port_or_address)
    drain_timeout = w.drain_timeout if drain_timeout is None else drain_timeout
    log = w.logger()
    draining = threading.Event()
    finished = [0]  # tasks completed, for the watchdog's progress check

    class Task(WSGITask):
        def build_response_header(self):  # type: ignore[no-untyped-def]
            for name, value in self.response_headers:  # the app's; waitress checks CR/LF only
                if responsefields.forbidden(name, value):
                    # raised before a byte is written: waitress logs it and answers 500
                    raise ValueError(f"the app set a header with a forbidden character: {name!r}")
            if draining.is_set():
                self.set_close_on_finish()  # adds "Connection: close"
            return super().build_response_header()

        def service(self) -> None:
            try:
                super().service()
            finally:
                finished[0] += 1

    class Parser(HTTPRequestParser):
        def parse_header(self, header_plus: bytes) -> None:
            lenient = lenient_framing(header_plus)
            if lenient is not None:
                raise ParsingError(lenient)
            super().parse_header(header_plus)
            if self.command == "CONNECT":  # a tunnel: see httpserver._other_method
                raise ParsingError("CONNECT: this server opens no tunnels")
            host = self.headers.get("HOST")  # waitress joins repeated fields with ", "
            if (host is None and self.version == "1.1") or (host and "," in host):
                raise ParsingError("Host: none or more than one (RFC 9112, 3.2)")
            if self.expect_continue and (
                self.version != "1.1" or (self.content_length == 0 and not self.chunked)
            ):
                # no 100 (Continue) without a body to ask for (RFC 9110, 10.1.1), nor to
                # HTTP/1.0: waitress sent one and then read the next pipelined request
                # into this one (its fields and body joined to this one's, one answer)
                self.expect_continue = False

    class Channel(HTTPChannel):
        task_class = Task
        parser_class = Parser

    options: dict[str, Any] = {
        "threads": threads,
        "backlog": BACKLOG,
        "ident": w.name,
        **WSGI_LIMITS,
    }
    options.update(waitress_options)
    stop = threading.Event()
    listener = _ListenerWatch(sock, log, stop.set)  # before waitress's own listen()
    server = create_server(app, sockets=[sock], **options)
    server.channel_class = Channel
    dispatcher = server.task_dispatcher
    connection_limit = server.adj.connection_limit
    shed = connections_shed(
        log,
        f"connection_limit ({connection_limit})",
        "raise it (serve_wsgi(..., connection_limit=N))",
    )

    previous = {sig: signal.signal(sig, lambda s, f: stop.set()) for sig in STOP_SIGNALS}
    wd = Watchdog()
    tick = min(0.25, wd.interval or 0.25)
    seen = [-1]
    look_every = min(1.0, send_timeout / 4)  # not at every request: a few times a timeout

    def all_waiting_on_clients() -> list[Any]:
        """The channels every thread waits on for a client to take output, or []."""
        waiting = waiting_on_clients(server.active_channels.values())
        return waiting if len(waiting) >= threads else []

    def healthy() -> bool:
        progressed = finished[0] != seen[0]
        seen[0] = finished[0]
        # threads waiting on clients are not hung: the loop frees them (free_a_thread)
        return progressed or not dispatcher.queue or bool(all_waiting_on_clients())

    where = _describe(sock)
    w.ready(f"serving on {where}")
    log.info("worker %d (pid %d) serving on %s (waitress, %d threads)", w.id, w.pid, where, threads)

    def make_room() -> None:
        """At connection_limit, waitress stops accepting: a client holding that many
        connections would lock every other client out. While one waits to be accepted,
        the oldest connection with no response in progress is closed, as serve_asyncio
        does (its request, if it had begun one, is dropped); failing that, the one whose
        client has taken nothing of its output for longest: slow readers holding every
        connection would lock others out until send_timeout."""
        for ch in server.active_channels.values():
            if not ch.requests and not ch.total_outbufs_len and not ch.will_close:
                ch.will_close = True  # waitress closes it in the loop's next turn
                shed.count()
                return
        behind = furthest_behind(server.active_channels.values())
        if behind is not None:
            # at once: will_close waits for the socket to take data, which it does not
            behind.handle_close()
            shed.count()

    freed = CountedWarning(
        log,
        "closed %d connection(s) whose client took nothing while every thread waited on "
        "such clients and requests queued; raise threads if that is legitimate load",
    )

    def free_a_thread() -> None:
        """When requests queue and every thread waits for a client to take a response,
        close the connection whose client has taken nothing for longest (since the last
        look at least): else a few clients that never read hold every thread, and
        everyone else waits, until send_timeout."""
        if dispatcher.queue:
            stalled = furthest_behind(all_waiting_on_clients(), idle_for=look_every)
            if stalled is not None:
                stalled.handle_close()  # wakes its thread: the app's next write raises
                freed.count()

    deadline = None
    senders_looked_at = 0.0
    try:
        while True:
            wasyncore.loop(timeout=tick, map=server._map, use_poll=True, count=1)
            now = time.monotonic()
            if now >= senders_looked_at + look_every:
                senders_looked_at = now
                drop_stalled_senders(server.active_channels.values(), send_timeout)
                free_a_thread()
            if wd.due() and healthy():
                wd.ping()
            if not draining.is_set():
                listener.check()
            if (
                not draining.is_set()
                and len(server._map) >= connection_limit  # waitress's own test to accept
                and select.select([sock], [], [], 0)[0]  # a connection waits to be accepted
            ):
                make_room()
            for warning in (shed, freed):
                if time.monotonic() >= warning.logged_at + 1.0:
                    warning.flush()  # what count() left: at most a line a second
            if stop.is_set() and not draining.is_set():
                draining.set()
                wasyncore.dispatcher.close(server)  # stop accepting; keep the trigger
                w.stopping(f"draining {len(server.active_channels)} connection(s)")
                log.info("worker %d draining %d connection(s)", w.id, len(server.active_channels))
                deadline = time.monotonic() + drain_timeout
                drain_began = time.time()
            if draining.is_set():
                now = time.monotonic()
                channels = list(server.active_channels.values())
                if not channels or now >= (deadline or now):
                    break
                for ch in channels:
                    # An idle connection gets fresh_grace to send one more request
                    # (answered with Connection: close): closing it at once races
                    # with a client reusing it.
                    idle = not ch.requests and ch.request is None and not ch.total_outbufs_len
                    waited = time.time() - max(ch.creation_time, drain_began)
                    if idle and waited >= fresh_grace:
                        ch.will_close = True
    finally:
        dispatcher.shutdown(cancel_pending=True, timeout=5)
        wasyncore.close_all(server._map)
        for sig, h in previous.items():
            signal.signal(sig, h)
    log.info("worker %d stopped", w.id)
    listener.raise_if_gone()
