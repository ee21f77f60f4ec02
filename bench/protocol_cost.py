"""serve_asyncio's own cost per keep-alive request, without sockets or an event loop.

    .venv/bin/python -m bench.protocol_cost [--requests 200000] [--callgrind]

Feeds wrk's request (``GET / HTTP/1.1``, one ``Host`` field) into one
``clusterkit.httpserver`` protocol again and again, its transport a stub that drops the
responses, the handler the benchmark's hello world. Prints the fastest of 5 passes in ns
per request; ``--callgrind`` instead counts CPU instructions per request under valgrind
(the difference between two request counts, so start-up cancels out), a figure that does
not drift with the machine. A bare httptools protocol that writes a fixed response is
measured beside it: the floor that parsing and four calls from C cost. A check of where a
request's time goes (the kernel's TCP work and uvloop are not in it), not part of
bench/run.py.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--run", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.run:  # one measured process, under valgrind
        time_per_request(a.run[0], int(a.run[1]))
        return 0
    if a.requests < 1:
        p.error("--requests: at least 1")
    if a.callgrind and not shutil.which("valgrind"):
        p.error("--callgrind needs valgrind: apt-get install valgrind")
    for kind in ("clusterkit", "bare"):
        if a.callgrind:
            n = min(a.requests, 4000)  # callgrind runs ~50x slower
            print(f"{kind}: {instructions_per_request(kind, n):,.0f} instructions per request")
        else:
            print(f"{kind}: {time_per_request(kind, a.requests):,.0f} ns per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
