"""serve_asyncio's own cost per keep-alive request, without sockets or an event loop.

    .venv/bin/python -m bench.protocol_cost [--requests 200000] [--callgrind] [--asgi]

Feeds wrk's request (``GET / HTTP/1.1``, one ``Host`` field) into one
``clusterkit.httpserver`` protocol again and again, its transport a stub that drops the
responses, the handler the benchmark's hello world. Prints the fastest of 5 passes in ns
per request; ``--callgrind`` instead counts CPU instructions per request under valgrind
(the difference between two request counts, so start-up cancels out), a figure that does
not drift with the machine. A bare httptools protocol that writes a fixed response is
measured beside it: the floor that parsing and four calls from C cost. A check of where a
request's time goes (the kernel's TCP work and uvloop are not in it), not part of
bench/run.py.

``--asgi`` measures uvicorn's httptools protocol instead, in a uvloop loop with an
ASGI app that answers at once: as serve_asgi runs it (``uvicorn-guarded``, with
clusterkit.asgiprotocols' additions) and as uvicorn ships it (``uvicorn``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import subprocess
import sys
import time

import httptools

from clusterkit.httpserver import ConnectionSet

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n\r\n"


class _DropTransport:
    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name: str) -> object:  # the peer, read once per connection
        return ("127.0.0.1", 40000) if name == "peername" else None

    def get_write_buffer_size(self) -> int:  # every response taken at once
        return 0


class _Bare:
    """The floor: llhttp's callbacks into Python, and one write of a fixed response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport = _DropTransport()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_headers_complete(self) -> None:
        pass

    def on_message_complete(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello world\n")


def _feed(kind: str) -> object:
    """The data_received of a fresh protocol of *kind* (clusterkit or bare)."""
    if kind == "bare":
        return _Bare().data_received
    state = ConnectionSet(lambda request: b"hello world\n", logging.getLogger("protocol_cost"))
    protocol = state.protocol()
    protocol.connection_made(_DropTransport())
    return protocol.data_received


def time_per_request(kind: str, requests: int, passes: int = 5) -> float:
    """ns per request: the fastest of *passes* passes of *requests* requests."""
    feed = _feed(kind)
    for _ in range(1000):
        feed(REQUEST)
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for _ in range(requests):
            feed(REQUEST)
        best = min(best, (time.perf_counter() - start) / requests * 1e9)
    return best


async def _hello_asgi(scope, receive, send) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"12")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello world\n"})


class _AnsweredTransport(asyncio.Transport):
    """Drops what is written; resolves ``answered`` when a response body is."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: asyncio.Future | None = None

    def write(self, data: bytes) -> None:
        if self.answered is not None and data.endswith(b"hello world\n"):
            self.answered.set_result(None)
            self.answered = None

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 3000), "peername": ("127.0.0.1", 40000)}.get(name)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _asgi_passes(kind: str, requests: int, passes: int) -> float:
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from clusterkit.asgiprotocols import guarded_httptools
    from clusterkit.limits import Limits

    cls = guarded_httptools(Limits()) if kind == "uvicorn-guarded" else HttpToolsProtocol
    config = Config(_hello_asgi, log_level="warning", access_log=False, lifespan="off")
    config.load()
    loop = asyncio.get_running_loop()
    protocol = cls(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    transport = _AnsweredTransport()
    protocol.connection_made(transport)
    best = float("inf")
    for n in [1000] + [requests] * passes:  # the first: warm-up
        start = time.perf_counter()
        for _ in range(n):
            transport.answered = loop.create_future()
            protocol.data_received(REQUEST)
            await transport.answered
        if n == requests:
            best = min(best, (time.perf_counter() - start) / n * 1e9)
    return best


def measure(kind: str, requests: int, passes: int = 5) -> float:
    """ns per request of *kind*: clusterkit or bare (serve_asyncio's protocol or the
    floor), uvicorn or uvicorn-guarded (uvicorn's httptools protocol)."""
    if kind.startswith("uvicorn"):
        import uvloop

        return uvloop.run(_asgi_passes(kind, requests, passes))
    return time_per_request(kind, requests, passes)


def _instructions(kind: str, requests: int) -> int:
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    argv += [sys.executable, "-m", "bench.protocol_cost", "--run", kind, str(requests)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stderr
    line = next(x for x in out.splitlines() if "Collected" in x)
    return int(line.split()[-1])


def instructions_per_request(kind: str, requests: int) -> float:
    """CPU instructions per request, counted by callgrind over two request counts."""
    few, many = _instructions(kind, requests), _instructions(kind, 2 * requests)
    return (many - few) / (5 * requests)  # time_per_request runs 5 passes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200_000, help="requests per pass")
    p.add_argument("--callgrind", action="store_true", help="count instructions (valgrind)")
    p.add_argument("--asgi", action="store_true", help="uvicorn's protocol, guarded and not")
    p.add_argument("--run", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.run:  # one measured process, under valgrind
        measure(a.run[0], int(a.run[1]))
        return 0
    if a.requests < 1:
        p.error("--requests: at least 1")
    if a.callgrind and not shutil.which("valgrind"):
        p.error("--callgrind needs valgrind: apt-get install valgrind")
    for kind in ("uvicorn-guarded", "uvicorn") if a.asgi else ("clusterkit", "bare"):
        if a.callgrind:
            n = min(a.requests, 4000)  # callgrind runs ~50x slower
            print(f"{kind}: {instructions_per_request(kind, n):,.0f} instructions per request")
        else:
            requests = a.requests // 10 if a.asgi else a.requests  # ~15 us each, not ~2
            print(f"{kind}: {measure(kind, requests):,.0f} ns per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
