"""Scenario test app: a clusterkit worker that says which worker answered.

Built on :func:`clusterkit.serve.serve_asyncio` (listens on ``CK_PORT``, default
3000). Every response carries ``X-Worker: ID`` and ``X-Pid: PID`` and the body
``ID PID``. Special paths, for the scenarios:

- ``GET /exit/N``: answer, then end the process with status N (``os._exit``);
- ``GET /hang``: block the event loop for good (``time.sleep`` in the handler),
  so the watchdog pings stop;
- ``GET /shutdown-listener/ID``: if this is worker ID, answer, then ``shutdown(SHUT_RDWR)``
  the listening socket systemd passed (fd 3), which every worker of a shared socket
  shares, twice: an attack; ``/shutdown-listener-exit/ID``: the same, then exit 1 at once;
- ``GET /spawn-threads/ID``: if this is worker ID, start threads that sleep for good until
  no more can start, and answer how many did (an app gone hostile, taking pids);
- at start, if ``/run/ck-crash/ID`` exists, exit 1 before serving (a crash loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
import time

from clusterkit import cluster
from clusterkit.httpserver import Request, Response
from clusterkit.serve import serve_asyncio

WORKER_ID = cluster.worker.id if cluster.worker is not None else 0
CRASH_MARKER = f"/run/ck-crash/{WORKER_ID}"


def handle(request: Request) -> Response:
    """Answer with this worker's id and pid; /exit/N and /hang do what they say."""
    headers = [("X-Worker", str(WORKER_ID)), ("X-Pid", str(os.getpid()))]
    path = request.path
    if path.startswith("/exit/"):
        status = int(path.removeprefix("/exit/"))
        asyncio.get_running_loop().call_later(0.1, os._exit, status)
    elif path == "/hang":
        time.sleep(1000)
    elif path == f"/spawn-threads/{WORKER_ID}":
        return Response(f"{spawn_threads()}\n", headers=headers)
    elif path.startswith("/shutdown-listener") and path.endswith(f"/{WORKER_ID}"):
        asyncio.get_running_loop().call_later(0.1, shut_down_listener, "-exit/" in path)
    return Response(f"{WORKER_ID} {os.getpid()}\n", headers=headers)


def spawn_threads() -> int:
    """Start threads that never end until the kernel refuses one; how many started."""
    started = 0
    while True:
        try:
            threading.Thread(target=time.sleep, args=(10**6,), daemon=True).start()
        except RuntimeError:  # "can't start new thread": EAGAIN from clone()
            return started
        started += 1


def shut_down_listener(then_exit: bool) -> None:
    listener = socket.socket(fileno=os.dup(3))
    listener.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):  # a second time sets its flags for good (ENOTCONN)
        listener.shutdown(socket.SHUT_RDWR)
    if then_exit:
        os._exit(1)


def main() -> None:
    """Crash at start if told to, else serve until SIGTERM."""
    if os.path.exists(CRASH_MARKER):
        print(f"worker {WORKER_ID}: {CRASH_MARKER} exists, crashing", file=sys.stderr)
        sys.exit(1)
    serve_asyncio(handle, int(os.environ.get("CK_PORT", "3000")))


if __name__ == "__main__":
    main()
