"""The app the protocol suite (tests/test_protocol.py) serves, one per server.

``python protocol_app.py KIND`` (one of ``KINDS``): the socket comes as fd 3
(LISTEN_FDS=1); ``CK_TIMEOUT`` (seconds) shortens the header, body, keep-alive and
send timeouts so the suite sees them fire, ``CK_KEEP_ALIVE`` sets keep-alive's apart.
Routes, the same in each:

- ``/``: ``hello``; ``/echo``: the request body; ``/slow``: ``slow`` after 0.2 s;
- ``/noread``: ``hello`` without reading the body (the ASGI app; the others read it);
- ``/xff``: the request's ``X-Forwarded-For`` header, or ``-``;
- ``/none``: the handler returns nothing; ``/raise``: it raises;
- ``/bad-header/N``: it sets ``BAD_HEADERS[N]`` (the first: CR/LF in a value);
- ``/length``: it sets its own ``Content-Length``; ``/204``: No Content;
- ``/close``: ``bye`` with ``Connection: close`` (the app ends the connection; not WSGI);
- ``/mark/NAME``: ``hello``, and ``ran NAME`` on stderr: the suite sees which handlers ran;
- ``/big``: ``BIG_SIZE`` bytes, more than the kernel's socket buffers hold;
- ``asyncio`` only: ``/sync/N`` and ``/sized/N``, N bytes from a handler that answers at
  once and from a coroutine; ``/surrogate``: a str with a lone surrogate (no UTF-8);
  ``/shared``: the same 4 MiB bytes object for every request (a cached page, say);
- ``wsgi`` only: ``/sized/N``, N bytes; ``/stream/N``, N MiB from a generator, a MiB at
  a time (``CK_THREADS``: waitress's threads, 2 unless set);
  ``/sync-close``: ``/close`` from a handler that answers at once;
- a websocket (the ``-ws`` kinds): each text message echoed.
"""

from __future__ import annotations

import asyncio
import os
import sys

from clusterkit.limits import Limits

TIMEOUT = float(os.environ.get("CK_TIMEOUT", "1"))
#: the keep-alive timeout (waitress: its channel_timeout), unless a test sets it apart
KEEP_ALIVE = float(os.environ.get("CK_KEEP_ALIVE", TIMEOUT))
#: the header, body, keep-alive and send timeouts every server here is given
LIMITS = Limits(
    header_timeout=TIMEOUT,
    body_timeout=TIMEOUT,
    keep_alive_timeout=KEEP_ALIVE,
    send_timeout=TIMEOUT,
)
BIG_SIZE = 64 << 20
MiB = 1 << 20
#: the /shared body (asyncio): one bytes object every response to it sends
SHARED = b"s" * (4 << 20)


def mark(path: str) -> bool:
    """For /mark/NAME: say on stderr that the handler ran (True)."""
    if path.startswith("/mark/"):
        print(f"ran {path[6:]}", file=sys.stderr, flush=True)
        return True
    return False


def big() -> bytes:
    """The /big body, made for each request (and let go of with it): not in every server,
    nor in the suite that imports this module, and not kept where the suite measures RSS."""
    return b"x" * BIG_SIZE


SPLIT = "a\r\nSet-Cookie: evil=1"
#: response fields no server may send (RFC 9110, 5.1 and 5.5: a name is a token, a value
#: has no control character but tab), each with the part that is wrong
BAD_HEADERS = [
    ("X-Bad", SPLIT, "value"),  # response splitting
    ("X-Bad", "a\rSet-Cookie: evil=1", "value"),  # a bare CR: a line end to some parsers
    ("X-Bad", "a\x0bb", "value"),  # vertical tab
    ("X-Bad", "evil\x1b[2J", "value"),  # an escape sequence, for whoever logs it
    ("X-Bad", "evil\x7f", "value"),  # DEL
    ("X(Bad)", "evil", "name"),  # separators in a name
    ("X-Bad:evil", "x", "name"),  # a colon: the value would start early
]


def run_asyncio() -> None:
    from clusterkit.httpserver import Response
    from clusterkit.serve import serve_asyncio

    def handler(req):
        """Answers /sync/N itself, at once, as a plain function does; else a coroutine."""
        if req.path.startswith("/sync/"):
            return b"x" * min(int(req.path.rpartition("/")[2]), BIG_SIZE)
        if req.path == "/sync-close":
            return Response("bye", headers=[("Connection", "close")])
        if req.path == "/shared":
            return SHARED
        if mark(req.path):
            return "hello"
        return routes(req)

    async def routes(req):
        path = req.path
        if path.startswith("/sized/"):
            return b"x" * min(int(path.rpartition("/")[2]), BIG_SIZE)
        if path == "/surrogate":  # text an app decoded from JSON, say: "\ud800" is valid there
            return "hi \ud800"
        if path == "/echo":
            return Response(req.body, headers=[("Content-Type", "application/octet-stream")])
        if path == "/xff":
            return req.header("x-forwarded-for", "-")
        if path == "/slow":
            await asyncio.sleep(0.2)
            return "slow"
        if path == "/none":
            return None
        if path == "/raise":
            raise RuntimeError("boom from /raise")
        if path.startswith("/bad-header/"):
            name, value, _ = BAD_HEADERS[int(path.rpartition("/")[2])]
            return Response("x", headers=[(name, value)])
        if path == "/length":
            return Response("hello", headers=[("Content-Length", "5")])
        if path == "/204":
            return Response(b"", 204, headers=[])
        if path == "/close":
            return Response("bye", headers=[("Connection", "close")])
        if path == "/big":
            return big()
        return "hello"

    serve_asyncio(handler, None, limits=LIMITS, drain_timeout=1)


def run_uvicorn(**options) -> None:
    from clusterkit.serve import serve_asgi

    async def app(scope, receive, send):
        if scope["type"] == "websocket":  # an echo, for the kinds that have a websocket library
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            while (message := await receive())["type"] == "websocket.receive":
                await send({"type": "websocket.send", "text": message.get("text")})
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        body = b""
        more = path != "/noread"  # /noread: answered without reading the body
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(b"content-type", b"text/plain")]
        mark(path)
        if path == "/echo":
            out = body
        elif path == "/big":
            out = big()
        elif path == "/xff":
            out = dict(scope["headers"]).get(b"x-forwarded-for", b"-")
        elif path == "/close":
            headers.append((b"connection", b"close"))
            out = b"bye"
        elif path == "/slow":
            await asyncio.sleep(0.2)
            out = b"slow"
        elif path == "/none":
            return
        elif path == "/raise":
            raise RuntimeError("boom from /raise")
        elif path == "/204":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        elif path.startswith("/bad-header/"):
            name, value, _ = BAD_HEADERS[int(path.rpartition("/")[2])]
            headers.append((name.encode(), value.encode()))
            out = b"x"
        else:
            out = b"hello"
        headers.append((b"content-length", str(len(out)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    if "CK_CONCURRENCY" in os.environ:  # uvicorn's limit_concurrency, lowered for a test
        options["limit_concurrency"] = int(os.environ["CK_CONCURRENCY"])
    serve_asgi(app, None, drain_timeout=1, limits=LIMITS, log_level="info", **options)


def run_wsgi() -> None:
    from clusterkit.serve import serve_wsgi

    def app(environ, start_response):
        body = environ["wsgi.input"].read()
        path = environ["PATH_INFO"]
        mark(path)
        if path.startswith("/stream/"):  # N MiB from a generator, as a streaming app writes
            start_response("200 OK", [("Content-Type", "text/plain")])
            return (b"x" * MiB for _ in range(int(path.rpartition("/")[2])))
        out = body if path == "/echo" else big() if path == "/big" else b"hello"
        if path.startswith("/sized/"):
            out = b"x" * min(int(path.rpartition("/")[2]), BIG_SIZE)
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))]
        if path.startswith("/bad-header/"):
            name, value, _ = BAD_HEADERS[int(path.rpartition("/")[2])]
            headers.append((name, value))
        start_response("200 OK", headers)
        return [out]

    serve_wsgi(
        app,
        None,
        drain_timeout=1,
        threads=int(os.environ.get("CK_THREADS", "2")),
        channel_timeout=max(1, int(KEEP_ALIVE)),
        send_timeout=TIMEOUT,
    )


KINDS = {
    "asyncio": run_asyncio,
    # websockets off, whatever is installed: Upgrade is then ignored, as the suite expects
    "uvicorn": lambda: run_uvicorn(ws="none"),
    "uvicorn-h11": lambda: run_uvicorn(http="h11", ws="none"),  # serve_asgi's other protocol
    # uvicorn hands an upgraded connection to the websockets library
    "uvicorn-ws": lambda: run_uvicorn(ws="websockets"),
    "uvicorn-h11-ws": lambda: run_uvicorn(http="h11", ws="websockets"),
    "wsgi": run_wsgi,
}

if __name__ == "__main__":
    KINDS[sys.argv[1]]()
