"""The harness's loads (threads on bench/http1.py, the HTTP client the tests use too):
availability, latency of every request, and per-worker counts.

Which worker served a connection is found without touching the servers: the client looks up the
server side of its own TCP connection with sock_diag (NETLINK_SOCK_DIAG, exact 4-tuple lookup),
which gives the socket's inode once a process has accept()ed it, and then finds the worker pid
whose fd table holds that inode (/proc/PID/fd). The request is sent in two parts (all but the
final CRLF, then the CRLF once the owner is known) so that servers that close the connection
after every response (gunicorn's sync worker) are attributed too.

Every thread first joins the network namespace of `netns_pid` when one is given (setns on the
thread), so the same code reaches a server in a systemd-nspawn container with a private network.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable

from bench import http1, procfs

enter_netns = http1.join_netns
run_in_netns = http1.run_in_netns


# --- sock_diag: inode of the server side of a connection -------------------------------------

_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2


class SockDiag:
    """One NETLINK_SOCK_DIAG socket (per thread: it belongs to the thread's network namespace)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def server_inode(self, server: tuple[str, int], client: tuple[str, int]) -> int:
        """Inode of the TCP socket whose local end is `server` and remote end `client`.

        0 while the connection sits in the accept queue (no process has accepted it yet),
        -1 if no such connection exists.
        """
        self.seq += 1
        sockid = struct.pack(
            "!HH16s16s",
            server[1],
            client[1],
            socket.inet_aton(server[0]) + b"\0" * 12,
            socket.inet_aton(client[0]) + b"\0" * 12,
        ) + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)
        req = struct.pack("=BBBxI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
        hdr = struct.pack(
            "=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, self.seq, 0
        )
        self.sock.send(hdr + req)
        data = self.sock.recv(65536)
        _, mtype, _, _, _ = struct.unpack_from("=IHHII", data)
        if mtype == _NLMSG_ERROR:
            return -1
        # with no such connection the kernel's lookup returns the listening socket: reject it
        if struct.unpack_from("!H", data, 16 + 4 + 2)[0] != client[1]:
            return -1
        # inet_diag_msg: family..retrans (4), sockid (48), expires, rqueue, wqueue, uid, inode
        return struct.unpack_from("=I", data, 16 + 4 + 48 + 16)[0]


def owner_pid(inode: int, candidates: list[int]) -> int | None:
    for pid in candidates:
        if inode in procfs.socket_inodes(pid):
            return pid
    return None


# --- HTTP ----------------------------------------------------------------------------------


class Conn(http1.Conn):
    """A :class:`bench.http1.Conn` that knows which worker pid accepted it once attributed."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout)
        self.pid: int | None = None

    def attribute(self, diag: SockDiag, workers: Callable[[], list[int]], timeout: float) -> None:
        """Find the worker that accepted this connection (call before completing a request)."""
        client = self.sock.getsockname()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            inode = diag.server_inode((self.host, self.port), client)
            if inode > 0:
                pid = owner_pid(inode, workers())
                if pid is not None:
                    self.pid = pid
                    return
            time.sleep(0.0005)

    def get(
        self,
        close: bool,
        attribute: tuple[SockDiag, Callable[[], list[int]]] | None = None,
        attr_timeout: float = 2.0,
    ) -> tuple[int, bool]:
        """One GET /: (status, server closes). With ``attribute``, the request's final CRLF is
        sent only once the worker that accepted the connection is known."""
        req = http1.request_bytes(self.host, "/", keepalive=not close)
        if attribute and self.pid is None:
            self.send(req[:-2])
            self.attribute(*attribute, attr_timeout)
            self.send(req[-2:])
        else:
            self.send(req)
        reused = self.requests > 0
        try:
            status, _, _, keeps = self.read_response()
            return status, not keeps
        except (OSError, EOFError, http1.BadResponse) as e:
            # on a reused keep-alive connection with no byte of response: either the server
            # closed the idle connection as we reused it, or the worker died with the request;
            # HTTP clients retry such a GET on a new connection
            e.reused_no_response = reused and not self.buf  # type: ignore[attr-defined]
            raise


FAILURES = (OSError, EOFError, http1.BadResponse)
_classify = http1.classify


def attributed_request(
    host: str, port: int, workers: Callable[[], list[int]], diag: SockDiag, timeout: float = 2.0
) -> tuple[int | None, str | None]:
    """One request on a new connection. Returns (pid that served it, failure kind or None)."""
    try:
        c = Conn(host, port, timeout)
    except OSError as e:
        return None, _classify(e)
    try:
        status, _ = c.get(close=True, attribute=(diag, workers), attr_timeout=timeout)
        return c.pid, None if 200 <= status < 300 else http1.NON_2XX
    except FAILURES as e:
        return c.pid, _classify(e)
    finally:
        c.close()


# --- loads -----------------------------------------------------------------------------------


#: a request that took longer than this (seconds) is counted as slow
SLOW = 0.5


class Load:
    """Threads sending requests until stop() (or max_seconds), counting outcomes.

    keepalive_threads reuse one connection (reconnecting after a close or failure);
    close_threads open a new connection per request (`Connection: close`). With attribute=True
    every connection is attributed to the worker that accepted it, and successes are counted per
    worker pid.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        keepalive_threads: int = 0,
        close_threads: int = 0,
        netns_pid: int | None = None,
        workers: Callable[[], list[int]] | None = None,
        timeout: float = 2.0,
        max_seconds: float = 10.0,
        max_requests: int = 2_000_000,
    ) -> None:
        self.host, self.port = host, port
        self.netns_pid = netns_pid
        self.workers = workers
        self.timeout = timeout
        self.max_requests = max_requests
        self.deadline = 0.0
        self.max_seconds = max_seconds
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: Counter[str] = Counter()
        self.per_worker: Counter[int] = Counter()
        self.unattributed = 0
        self.reused_no_response = 0  # failures on a reused keep-alive connection, no byte back
        self.max_latency = 0.0  # the slowest request, failed or not (seconds)
        self.slow: Counter[str] = Counter()  # requests slower than SLOW, by outcome
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(False,), daemon=True)
            for _ in range(keepalive_threads)
        ] + [
            threading.Thread(target=self._run, args=(True,), daemon=True)
            for _ in range(close_threads)
        ]

    def start(self) -> Load:
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.max_seconds
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> Load:
        self.stopping.set()
        for t in self.threads:
            t.join(self.timeout + 1)
        self.seconds = time.monotonic() - self.t0
        if self.errors:
            raise RuntimeError(f"client thread crashed: {self.errors[0]!r}") from self.errors[0]
        return self

    @property
    def total(self) -> int:
        return self.ok + sum(self.failures.values())

    def _run(self, close: bool) -> None:
        try:
            enter_netns(self.netns_pid)
            diag = SockDiag() if self.workers else None
            attribute = (diag, self.workers) if diag else None
            conn: Conn | None = None
            while not self.stopping.is_set() and time.monotonic() < self.deadline:
                if self.total >= self.max_requests:
                    break
                kind = None
                pid = None
                sent = time.monotonic()
                try:
                    if conn is None:
                        conn = Conn(self.host, self.port, self.timeout)
                    status, closes = conn.get(close, attribute, self.timeout)
                    pid = conn.pid
                    if not 200 <= status < 300:
                        kind = http1.NON_2XX
                    if closes or close:
                        conn.close()
                        conn = None
                except FAILURES as e:
                    kind = _classify(e)
                    if getattr(e, "reused_no_response", False):
                        with self.lock:
                            self.reused_no_response += 1
                    if conn is not None:
                        conn.close()
                        conn = None
                took = time.monotonic() - sent
                with self.lock:
                    self.max_latency = max(self.max_latency, took)
                    if took > SLOW:
                        self.slow[kind or http1.OK] += 1
                    if kind is None:
                        self.ok += 1
                        if self.workers is not None:
                            if pid is None:
                                self.unattributed += 1
                            else:
                                self.per_worker[pid] += 1
                    else:
                        self.failures[kind] += 1
                if kind == http1.REFUSED:
                    time.sleep(0.001)  # the port is closed: do not spin
            if conn is not None:
                conn.close()
            if diag is not None:
                diag.close()
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.errors.append(e)
