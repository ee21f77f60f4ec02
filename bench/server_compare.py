"""serve_asyncio's protocol: our own (hardened, on httptools) vs uvicorn's, one worker.

    .venv/bin/python -m bench.server_compare [--seconds 3] [--runs 3] [--old REV]

Each server runs the same handler (``hello world\\n``) in one process on a
loopback socket passed as fd 3, and wrk measures it for a few seconds with
keep-alive and with a new connection per request (``Connection: close``). The
server is pinned to the last CPU and wrk to the others when there are two or
more. Servers:

- ``own``: ``serve_asyncio`` (clusterkit.httpserver, hardened);
- ``own-old``: ``serve_asyncio`` as of ``--old REV`` (before the hardening), if given;
- ``uvicorn-httptools`` / ``uvicorn-h11``: the same handler adapted to ASGI and
  served by uvicorn's HttpToolsProtocol / H11Protocol as ``serve_asgi`` runs them
  (guarded: clusterkit.asgiprotocols), what adopting uvicorn's protocol for
  serve_asyncio would cost;
- ``uvicorn-httptools-stock``: uvicorn's HttpToolsProtocol as uvicorn ships it, to
  show what the guard costs;
- ``floor``: bench/systems/python/clusterkit_floor.py, the least a Python server on
  uvloop and httptools can do per request (a fixed response when a request ends; no
  limits, no timeouts, no Request, no handler): the ceiling of any such server here;
- ``node``: the seed's worker, Node's ``http.createServer`` hello world, one process.

It prints a Markdown table of medians (and min–max) for bench/SERVER.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import parse_wrk

ROOT = Path(__file__).resolve().parent.parent

SERVER = r"""
import sys
kind = sys.argv[1]
BODY = b"hello world\n"
if kind == "own":
    from clusterkit.serve import serve_asyncio
    serve_asyncio(lambda request: BODY, None, drain_timeout=1)
else:
    from clusterkit.httpserver import Request, Response
    from clusterkit.serve import serve_asgi

    def handler(request):
        return BODY

    async def app(scope, receive, send):  # a handler as an ASGI app: what (b) would run
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        result = handler(Request(scope["method"], target, headers, body, scope["http_version"]))
        if not isinstance(result, Response):
            result = Response(result)
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in result.headers]
        out.append((b"content-length", str(len(result.body)).encode()))
        await send({"type": "http.response.start", "status": result.status, "headers": out})
        await send({"type": "http.response.body", "body": result.body})

    http = kind.split("-")[1]
    if kind.endswith("-stock"):  # a class is run as given: uvicorn's, without clusterkit's guard
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as http
    serve_asgi(app, None, drain_timeout=1, http=http, log_level="warning", access_log=False)
"""

FLOOR = ROOT / "bench" / "systems" / "python" / "clusterkit_floor.py"

NODE = """
const http = require('http');
http.createServer((req, res) => {
  res.writeHead(200);
  res.end('hello world\\n');
}).listen({fd: 3});
"""

SERVERS = ("own", "uvicorn-httptools", "uvicorn-httptools-stock", "uvicorn-h11", "floor", "node")

LAUNCH = (
    "import os, sys; fd = int(sys.argv[1]); fd != 3 and (os.dup2(fd, 3), os.close(fd)); "
    "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])"
)


def cpus() -> tuple[str | None, str | None]:
    n = os.cpu_count() or 1
    if n < 2:
        return None, None
    return str(n - 1), ",".join(str(i) for i in range(n - 1))


def start(kind: str, pythonpath: str, server_cpu: str | None) -> tuple[subprocess.Popen, int]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    env = dict(os.environ, LISTEN_FDS="1", CLUSTERKIT_NAME="bench", CLUSTERKIT_WORKER_ID="0")
    env["PYTHONPATH"] = pythonpath
    pin = ["taskset", "-c", server_cpu] if server_cpu else []
    argv = [*pin, sys.executable, "-c", LAUNCH, str(fd)]
    if kind == "node":
        argv += [shutil.which("node") or "/usr/bin/node", "-e", NODE]
    elif kind == "floor":
        argv += [sys.executable, str(FLOOR)]
    else:
        argv += [sys.executable, "-c", SERVER, "own" if kind.startswith("own") else kind]
    p = subprocess.Popen(argv, pass_fds=(fd,), env=env, stderr=subprocess.DEVNULL)
    listener.close()
    deadline = time.monotonic() + 15
    while True:  # served once it answers
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return p, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            p.kill()
            raise RuntimeError(f"{kind} did not start")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def wrk(pid: int, port: int, seconds: int, close: bool, load_cpus: str | None) -> dict:
    pin = ["taskset", "-c", load_cpus] if load_cpus else []
    argv = [*pin, "wrk", "-t1", "-c32", f"-d{seconds}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    cpu = cpu_seconds(pid)
    out = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 20
    )
    r = parse_wrk(out.stdout)
    # CPU time per request: unlike req/s, it hardly moves with the machine's other load
    r["cpu_us"] = (cpu_seconds(pid) - cpu) / max(1, r["requests"]) * 1e6
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--old", help="git revision of serve_asyncio before the hardening")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, of: %(default)s")
    args = ap.parse_args()
    server_cpu, load_cpus = cpus()
    kinds = args.servers.split(",")
    if unknown := set(kinds) - set(SERVERS):
        ap.error(
            f"--servers: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SERVERS)}"
        )
    paths = {k: str(ROOT) for k in kinds}
    if args.old:
        old = tempfile.mkdtemp(prefix="ck-old-")
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.old, "clusterkit"],
            capture_output=True,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
        kinds.insert(1, "own-old")
        paths["own-old"] = old
    results: dict[tuple[str, bool], list[dict]] = {}
    for run in range(args.runs):
        for kind in kinds:  # interleaved, so drift in the machine's load hits all alike
            p, port = start(kind, paths[kind], server_cpu)
            try:
                for close in (False, True):
                    r = wrk(p.pid, port, args.seconds, close, load_cpus)
                    results.setdefault((kind, close), []).append(r)
                    print(f"run {run} {kind:18} close={close!s:5} {r}", file=sys.stderr)
            finally:
                p.terminate()
                p.wait(10)
    pinned = f"server on CPU {server_cpu}, wrk on {load_cpus}" if server_cpu else "not pinned"
    print(
        f"wrk -t1 -c32, {args.seconds} s x {args.runs} runs per cell, {pinned}; "
        "median (min-max); server CPU time per request; errors = socket errors + non-2xx\n"
    )
    print(
        "| server | keep-alive req/s | keep-alive CPU µs/req | new connection req/s "
        "| new connection CPU µs/req | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for kind in kinds:
        cells = []
        for close in (False, True):
            for key, fmt in (("rps", "{:,.0f}"), ("cpu_us", "{:,.1f}")):
                xs = [r[key] for r in results[(kind, close)]]
                m, lo, hi = (fmt.format(x) for x in (statistics.median(xs), min(xs), max(xs)))
                cells.append(f"{m} ({lo}-{hi})")
        errors = sum(r["errors"] for c in (False, True) for r in results[(kind, c)])
        print(f"| {kind} | {' | '.join(cells)} | {errors} |")


if __name__ == "__main__":
    main()
