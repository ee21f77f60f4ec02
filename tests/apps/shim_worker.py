"""The accept loop of the test workers that use the shim alone (no ``serve_*``).

:func:`serve` listens through ``cluster.worker.listen``, says READY, then hands
each connection, blocking, to ``answer`` and closes it, until SIGTERM (checked
between connections: a graceful stop). The workers' scripts are strings the
tests write into a container; they import this module by its path
(``sys.path.insert(0, APPS)``).
"""

from __future__ import annotations

import selectors
import signal
import socket
from collections.abc import Callable

from clusterkit import cluster


def serve(answer: Callable[[socket.socket], None], port: int = 3000) -> None:
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    sock = cluster.worker.listen(port)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    cluster.worker.ready()
    while not stop:
        if not sel.select(0.1):
            continue
        try:
            conn, _ = sock.accept()
        except BlockingIOError:  # another worker took it
            continue
        with conn:
            conn.setblocking(True)
            answer(conn)
