"""The app the protocol suite (tests/test_protocol.py) serves, one per server.

``python protocol_app.py asyncio|uvicorn``: the socket comes as fd 3
(LISTEN_FDS=1); ``CK_TIMEOUT`` (seconds) shortens the header, body and
keep-alive timeouts so the suite sees them fire. Routes, the same in both:

- ``/``: ``hello``; ``/echo``: the request body; ``/slow``: ``slow`` after 0.2 s;
- ``/none``: the handler returns nothing; ``/raise``: it raises;
- ``/crlf``: it sets a header value with CR/LF in it;
- ``/length``: it sets its own ``Content-Length``.
"""

from __future__ import annotations

import asyncio
import os
import sys

TIMEOUT = float(os.environ.get("CK_TIMEOUT", "1"))
SPLIT = "a\r\nSet-Cookie: evil=1"


def run_asyncio() -> None:
    from clusterkit.httpserver import Limits, Response
    from clusterkit.serve import serve_asyncio

    async def handler(req):
        path = req.path
        if path == "/echo":
            return Response(req.body, headers=[("Content-Type", "application/octet-stream")])
        if path == "/slow":
            await asyncio.sleep(0.2)
            return "slow"
        if path == "/none":
            return None
        if path == "/raise":
            raise RuntimeError("boom from /raise")
        if path == "/crlf":
            return Response("x", headers=[("X-Bad", SPLIT)])
        if path == "/length":
            return Response("hello", headers=[("Content-Length", "5")])
        return "hello"

    limits = Limits(header_timeout=TIMEOUT, body_timeout=TIMEOUT, keep_alive_timeout=TIMEOUT)
    serve_asyncio(handler, None, limits=limits, drain_timeout=1)


def run_uvicorn() -> None:
    from clusterkit.serve import serve_asgi

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(b"content-type", b"text/plain")]
        if path == "/echo":
            out = body
        elif path == "/slow":
            await asyncio.sleep(0.2)
            out = b"slow"
        elif path == "/none":
            return
        elif path == "/raise":
            raise RuntimeError("boom from /raise")
        elif path == "/crlf":
            headers.append((b"x-bad", SPLIT.encode()))
            out = b"x"
        else:
            out = b"hello"
        headers.append((b"content-length", str(len(out)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    serve_asgi(app, None, drain_timeout=1, timeout_keep_alive=TIMEOUT, log_level="info")


if __name__ == "__main__":
    {"asyncio": run_asyncio, "uvicorn": run_uvicorn}[sys.argv[1]]()
