"""The current worker: who am I, and which socket do I serve on.

A clusterkit unit starts each worker as ``NAME@K.service`` with
``CLUSTERKIT_NAME``, ``CLUSTERKIT_WORKER_ID=K`` and ``CLUSTERKIT_SCHEDULING`` in
its environment, and systemd passes the listening sockets (sd_listen_fds(3)):
fds 3.. ``3+LISTEN_FDS-1``, named by ``LISTEN_FDNAMES`` (clusterkit names them
all ``http``), valid only if ``LISTEN_PID`` is our pid.

The passed sockets are one open file description shared with PID 1 and every
other worker, including its O_NONBLOCK flag (the unit sets ``NonBlocking=yes``).
Nothing here calls ``setblocking(True)`` or ``settimeout()`` on them: that would
flip the flag under every other worker's accept loop.

Development without systemd: :func:`current` works in any process. With no
passed socket, :meth:`ThisWorker.listen` binds the address itself, so the script a
unit runs also runs as ``python server.py`` (Python's ``if __name__ ==
"__main__"`` plays the part of Node's ``if (!module.parent)``). Inside a real
unit (``INVOCATION_ID`` and ``CLUSTERKIT_WORKER_ID`` set) a missing socket is
a unit error and raises instead of quietly binding.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping

from systemd import daemon

from clusterkit import names, notify

Address = int | str | tuple[str, int] | None

#: Backlog for sockets we bind, and for asyncio/uvicorn/waitress, which call
#: listen() again on the socket they are given: on a passed socket that call
#: changes the backlog systemd set, for every worker. systemd's default
#: ``Backlog=`` is SOMAXCONN too, so re-listening with it changes nothing.
BACKLOG = socket.SOMAXCONN

_passed: dict[int, str] | None = None
_current: ThisWorker | None = None


def passed_fds() -> dict[int, str]:
    """``{fd: name}`` passed by systemd to *this* pid (LISTEN_PID checked), read once.

    The LISTEN_* variables are removed afterwards, as sd_listen_fds(3) advises,
    so that child processes do not believe the sockets are theirs.
    """
    global _passed
    if _passed is None:
        _passed = dict(daemon.listen_fds_with_names(unset_environment=True))
    return _passed


def is_managed(env: Mapping[str, str] | None = None) -> bool:
    """True when a clusterkit unit started this process (CLUSTERKIT_WORKER_ID is set)."""
    env = os.environ if env is None else env
    return bool(env.get(names.ENV_WORKER_ID, "").strip())


def _script_name() -> str:
    base = os.path.basename(sys.argv[0] or "") or "clusterkit"
    return os.path.splitext(base)[0] or "clusterkit"


def _parse(address: Address) -> tuple[str, object]:
    """('inet', (host, port)) or ('unix', path); host '' means any address."""
    if address is None:
        return ("any", None)
    if isinstance(address, int):
        return ("inet", ("", address))
    if isinstance(address, tuple):
        return ("inet", (address[0], int(address[1])))
    if address.isdigit():
        return ("inet", ("", int(address)))
    if address.startswith(("/", "@", "./")):
        return ("unix", address)
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit():
        return ("inet", (host.strip("[]"), int(port)))
    raise ValueError(f"not a port, host:port or socket path: {address!r}")


#: a worker's exit status when its listening socket stopped listening (EX_TEMPFAIL)
LISTENER_GONE = 75
#: how often the servers look whether their listening socket still listens (seconds)
LISTEN_CHECK_EVERY = 0.25


class ListenerGone(SystemExit):
    """The listening socket stopped listening (any process that holds it can shut it down):
    the worker ends with :data:`LISTENER_GONE`, and systemd starts it again with the socket
    it holds then, which the new worker makes listen again if need be (listen_again)."""

    def __init__(self, where: str) -> None:
        super().__init__(LISTENER_GONE)
        self.where = where

    def __str__(self) -> str:
        return (
            f"the listening socket {self.where} stopped listening (shut down by a process "
            f"that holds it?): exiting with status {LISTENER_GONE} to be started again"
        )


def listening(sock: socket.socket) -> bool:
    """Whether *sock* is open and listens."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    except OSError:
        return False


def listen_again(sock: socket.socket) -> bool:
    """Make *sock* listen again if it was shut down; True if it was, and listens now.

    shutdown() on a listening socket, from any process that holds it, stops it for every
    holder: for a shared socket, every worker and PID 1 (which fails the socket unit if it
    looks while worker 0 is down). listen() alone is not enough: a second shutdown() (of a
    socket already closed) leaves its shutdown flags set, listen() keeps them, and every
    connection accepted from then on inherits them (reset at once). shutdown(SHUT_RD) of a
    listening socket closes it and clears them; then it listens clean."""
    if listening(sock):
        return False
    try:
        sock.listen(BACKLOG)
        sock.shutdown(socket.SHUT_RD)
        sock.listen(BACKLOG)
    except OSError:  # closed, or the port is another socket's now
        return False
    return listening(sock)


def bound_to(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):  # abstract namespace
            return "@" + name[1:].decode(errors="replace")
        return name or "(unnamed unix socket)"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _matches(sock: socket.socket, kind: str, target: object) -> bool:
    if kind == "any":
        return True
    if kind == "unix":
        return sock.family == socket.AF_UNIX and bound_to(sock) == target
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    host, port = target  # type: ignore[misc]
    bound_host, bound_port = sock.getsockname()[:2]
    if bound_port != port:
        return False
    if host in ("", "0.0.0.0", "::", "*"):
        return True
    wildcard = bound_host in ("0.0.0.0", "::")
    return wildcard or bound_host == host or bound_host == f"::ffff:{host}"


class ThisWorker:
    """This process as one worker of a cluster (Node's ``cluster.worker``)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw_id = env.get(names.ENV_WORKER_ID, "").strip()
        #: the instance number (``%i``), 0-based; 0 in development
        self.id: int = int(raw_id) if raw_id else 0
        self.managed: bool = bool(raw_id)
        self.name: str = env.get(names.ENV_NAME) or _script_name()
        self.scheduling: str = env.get(names.ENV_SCHEDULING, names.SHARED)
        self.pid: int = os.getpid()
        #: unique per run, never reused (Node's worker ids never are either)
        self.invocation_id: str | None = env.get("INVOCATION_ID") or None
        #: seconds a graceful stop may spend on in-flight requests: the unit's
        #: --drain-timeout (its TimeoutStopSec= leaves a margin on top), else 30
        self.drain_timeout: float = float(env.get(names.ENV_DRAIN_TIMEOUT) or 30.0)
        self.in_unit: bool = self.managed and self.invocation_id is not None
        self._sockets: list[socket.socket] | None = None
        self._bound: dict[tuple[str, object], socket.socket] = {}
        self._ready = False

    def __repr__(self) -> str:
        return f"<Worker {self.unit or self.name} id={self.id} pid={self.pid}>"

    @property
    def unit(self) -> str | None:
        """``NAME@ID.service`` for a worker started by a clusterkit unit, else None."""
        return f"{self.name}@{self.id}.service" if self.managed else None

    @property
    def is_socket_activated(self) -> bool:
        """True when systemd (or systemd-socket-activate) passed us listening sockets."""
        return bool(passed_fds())

    def sockets(self) -> list[socket.socket]:
        """The passed listening sockets named ``http`` (all of them if none is named)."""
        if self._sockets is None:
            fds = passed_fds()
            named = [fd for fd, name in sorted(fds.items()) if name == names.FD_NAME]
            # socket(fileno=) reads family/type from the fd and leaves O_NONBLOCK alone.
            self._sockets = [socket.socket(fileno=fd) for fd in named or sorted(fds)]
        return list(self._sockets)

    def listen(self, port_or_address: Address = 3000) -> socket.socket:
        """The listening socket for *port_or_address*, like Node's ``server.listen(3000)``.

        *port_or_address*: a port (``3000``), ``"host:port"``, ``(host, port)``, a
        unix socket path (``"/run/x.sock"``, ``"@abstract"``), or None for "the one
        socket systemd passed". Under systemd the units own the address: a single
        passed socket is used whatever was asked (the address in the code is the
        development default); among several, the one matching the port or path.
        Without passed sockets the address is bound here (SO_REUSEADDR), once:
        calling again with the same address returns the same socket.
        """
        kind, target = _parse(port_or_address)
        passed = self.sockets()
        if len(passed) == 1:
            return passed[0]
        if passed:
            found = [s for s in passed if _matches(s, kind, target)]
            if kind == "any" and len(found) > 1:
                raise LookupError(
                    "several sockets were passed ("
                    + ", ".join(bound_to(s) for s in passed)
                    + "); say which one, e.g. listen(3000) or listen('/run/app.sock')"
                )
            if not found:
                raise LookupError(
                    f"listen({port_or_address!r}): systemd passed "
                    + ", ".join(bound_to(s) for s in passed)
                    + ", none of which matches; fix ListenStream= or the address"
                )
            return found[0]
        if self.in_unit:
            raise LookupError(
                f"{self.unit} was started without a listening socket: its unit needs "
                "Sockets= (shared) or a NAME@.socket (reuseport) with FileDescriptorName=http"
            )
        if kind == "any":
            raise LookupError("listen(None) needs a socket passed by systemd; give a port")
        key = (kind, target)
        if key not in self._bound:  # idempotent, like the passed sockets
            self._bound[key] = _bind(kind, target)
        return self._bound[key]

    def ready(self, status: str | None = None) -> bool:
        """READY=1, once: later calls only update STATUS=."""
        if self._ready:
            return notify.status(status) if status else False
        self._ready = True
        return notify.ready(status)

    def status(self, text: str) -> bool:
        return notify.status(text)

    def stopping(self, status: str | None = None) -> bool:
        return notify.stopping(status)

    def logger(self):  # -> logging.Logger; logging is imported lazily
        """The ``clusterkit`` logger: journal with this worker's fields, or stderr."""
        from clusterkit.log import get_logger

        return get_logger(self.name, self.id)


def _bind(kind: str, target: object) -> socket.socket:
    if kind == "unix":
        path = str(target)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if path.startswith("@"):
            sock.bind("\0" + path[1:])
        else:
            if os.path.exists(path):
                os.unlink(path)
            sock.bind(path)
        sock.listen(BACKLOG)
        return sock
    host, port = target  # type: ignore[misc]
    if host:
        return socket.create_server((host, port), backlog=BACKLOG, reuse_port=False)
    if socket.has_dualstack_ipv6():  # Node's listen(port) binds :: with IPv4 mapped in
        try:
            return socket.create_server(
                ("::", port), family=socket.AF_INET6, backlog=BACKLOG, dualstack_ipv6=True
            )
        except OSError:
            pass
    return socket.create_server(("0.0.0.0", port), backlog=BACKLOG)


def current() -> ThisWorker:
    """The ThisWorker for this process, in a unit or not (development)."""
    global _current
    if _current is None or _current.pid != os.getpid():
        _current = ThisWorker()
    return _current
