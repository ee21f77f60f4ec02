"""Throwaway containers with systemd as PID 1, for tests and ``clusterkit up``.

systemd is not PID 1 on development and CI machines, but it boots in well
under a second in ``systemd-nspawn`` from the host's own ``/usr``::

    with Container() as c:
        c.install_units([Path("app.socket"), Path("app@.service")])
        c.systemctl("start", "app.socket")
        status, body = c.http_get(8000)

How it works (see DESIGN.md, "Real systemd in tests"):

- ``systemd-nspawn --directory=/ --volatile=yes --boot``: a tmpfs root with the
  host's ``/usr``; ``/etc`` starts empty. The checkout holding this package is
  bound at the same path, so its venv (made from ``/usr/bin/python3``) runs inside.
- nspawn is started from cgroups of its own (``/sys/fs/cgroup/{systemd,unified}/NAME``
  on a hybrid host, ``/sys/fs/cgroup/NAME`` on a pure v2 host): containers that
  share one cgroup misbehave. The directories are removed at power-off.
- No host systemd is needed or used (``--register=no --keep-unit``); commands run
  inside through ``nsenter --all -t PID``, where PID is the container's PID 1.
- By default the container has its own network namespace: its own loopback,
  reachable from the host through :meth:`Container.socket`, :meth:`Container.http_get`
  and :meth:`Container.netns_run`.

Cleanup is layered, because a leaked container keeps running forever: ``with``
always powers off; :meth:`Container.start` powers off on any failure, timeout or
``KeyboardInterrupt``; an ``atexit`` hook powers off what is left; and, when
started from the main thread, nspawn gets ``SIGTERM`` (which it turns into an
orderly power-off) if this process dies without running any of those.

Only processes this module started are ever signalled: nspawn by pid and
process group, the container's PID 1 by pid, and leftovers in the cgroups
this module created.
"""

from __future__ import annotations

import atexit
import ctypes
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket as _socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from clusterkit.manager import CONTAINER_PATH, Manager

__all__ = ["Container", "ContainerError", "prerequisites_missing", "checkout_root", "stop_process"]


#: Units masked at boot (``systemd.mask=``): a throwaway container needs none of
#: them; timers would fire mid-test, and networkd must never touch the host's
#: interfaces when the network is shared. Boot time is the same with or without.
MASKED_UNITS = (
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",
    "console-getty.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
    # Enabled at first boot when installed on the host's /usr (bash dev test installs
    # them for the fleet test, which unmasks what each of its containers runs).
    "haproxy.service",
    "ssh.service",
    "ssh.socket",
    "rescue-ssh.target",
    "systemd-journal-remote.socket",
    "systemd-journal-remote.service",
    "systemd-journal-upload.service",
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_CLONE_NEWNET = 0x40000000
_LOG_TAIL = 6000  # characters of the boot log quoted in errors


class ContainerError(Exception):
    """The container failed to boot, or a command inside it failed (with ``check``)."""

    def __init__(self, message: str, result: subprocess.CompletedProcess[str] | None = None):
        super().__init__(message)
        self.result = result


def prerequisites_missing() -> str | None:
    """Return why containers cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "booting systemd containers needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian: apt-get install systemd-container util-linux)"
    if not _cgroup_roots():
        return "no writable cgroup hierarchy under /sys/fs/cgroup"
    return None


def checkout_root() -> Path | None:
    """The source checkout holding this package, if it is one (not under /usr)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and not root.is_relative_to("/usr"):
        return root
    return None


def _cgroup_roots() -> list[Path]:
    """Hierarchies to give each container its own cgroup in: v2 only, or hybrid v1 + v2."""
    if (_CGROUP_ROOT / "cgroup.controllers").exists():  # pure cgroup v2
        return [_CGROUP_ROOT] if os.access(_CGROUP_ROOT, os.W_OK) else []
    roots = [_CGROUP_ROOT / "systemd", _CGROUP_ROOT / "unified"]
    return [r for r in roots if (r / "cgroup.procs").exists() and os.access(r, os.W_OK)]


def _setns_net(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _run_group(
    argv: Sequence[str], *, timeout: float, input: str | None
) -> subprocess.CompletedProcess[str]:
    """Like ``subprocess.run``, but on timeout (or Ctrl-C) kill the child's process group."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd="/",  # never the caller's directory
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a process group led by ``proc``, its other members first.

    ``nsenter`` forks the command into the container's pid namespace. Killed
    together, the command is orphaned to the *host's* init, which may never reap
    it; the container then hangs 10 s at shutdown waiting for that zombie. So
    kill the command first and let ``nsenter`` reap it.
    """
    for pid in _pids_in_group(proc.pid):
        if pid != proc.pid:
            _signal(pid, signal.SIGKILL)
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_process(proc: subprocess.Popen[str]) -> None:
    """End a process started by :meth:`Container.popen` (the command first, then nsenter)."""
    if proc.poll() is None:
        _kill_group(proc)


class Container:
    """One throwaway systemd container; see the module docstring.

    ``binds``/``binds_ro`` take nspawn's ``--bind=`` syntax (``SRC[:DST[:OPTS]]``).
    The checkout of this package is always bound at its own path (read-only with
    ``checkout_read_only``, as ``clusterkit up`` does), and ``/etc/hosts`` read-only.
    ``private_network=False`` shares the host's network, so the host can reach a
    port the container listens on (``clusterkit up``).
    ``network_namespace`` (a path such as ``/run/netns/NAME``) puts the container in
    that existing namespace instead (a network of several containers). ``unmask``
    lists units of :data:`MASKED_UNITS` this container may run (e.g. ``ssh.service``).
    """

    _live: ClassVar[set[Container]] = set()  # for the atexit safety net

    def __init__(
        self,
        name: str | None = None,
        *,
        binds: Sequence[str] = (),
        binds_ro: Sequence[str] = (),
        private_network: bool = True,
        checkout_read_only: bool = False,
        network_namespace: str | None = None,
        unmask: Sequence[str] = (),
    ) -> None:
        self.name = name or f"ck-{secrets.token_hex(4)}"
        if not _NAME_RE.match(self.name):
            raise ValueError(f"bad machine name {self.name!r}: letters, digits and '-' only")
        self.binds = list(binds)
        self.binds_ro = list(binds_ro)
        self.private_network = private_network
        self.checkout_read_only = checkout_read_only
        self.network_namespace = network_namespace
        unknown = set(unmask) - set(MASKED_UNITS)
        if unknown:
            raise ValueError(f"unmask: not masked by default: {sorted(unknown)}")
        self.unmask = tuple(unmask)
        self.pid = 0  # the container's PID 1 as seen from the host; 0 until booted
        self._booted = False  # PID 1 handles SIGRTMIN+3 (clean power-off possible)
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cgroups: list[Path] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Container {self.name} pid={self.pid}>"

    # -- lifecycle ---------------------------------------------------------------

    def nspawn_argv(self) -> list[str]:
        """The ``systemd-nspawn`` command line this container boots with."""
        argv = [
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--directory=/",
            "--volatile=yes",
            f"--machine={self.name}",
            "--console=read-only",
            "--bind-ro=/etc/hosts",
        ]
        if self.network_namespace is not None:
            argv.append(f"--network-namespace-path={self.network_namespace}")
        elif self.private_network:
            argv.append("--private-network")
        root = checkout_root()
        if root is not None:
            argv.append(f"--bind-ro={root}" if self.checkout_read_only else f"--bind={root}")
        argv += [f"--bind={b}" for b in self.binds]
        argv += [f"--bind-ro={b}" for b in self.binds_ro]
        argv += ["--boot", "systemd.firstboot=off"]
        argv += [f"systemd.mask={u}" for u in MASKED_UNITS if u not in self.unmask]
        return argv

    def start(self, timeout: float = 60) -> Container:
        """Boot and wait until ``systemctl is-system-running`` says running (or degraded).

        On any failure, including a timeout or ``KeyboardInterrupt``, the container is
        powered off and cleaned up before the exception propagates.
        """
        if self._proc is not None:
            raise ContainerError(f"{self.name}: already started")
        missing = prerequisites_missing()
        if missing:
            raise ContainerError(missing)
        deadline = time.monotonic() + timeout
        try:
            self._spawn()
            self._wait_for_pid1(deadline)
            self._wait_running(deadline)
            self._open_path_to_checkout()
            self._show_checkout_through_private_tmp()
        except BaseException as exc:
            log = self.log()
            self.poweroff()
            if isinstance(exc, ContainerError):
                raise ContainerError(f"{exc}\n--- boot log ---\n{log}") from None
            raise
        return self

    def _spawn(self) -> None:
        """Start nspawn in its own session and cgroups, with output to a log file."""
        with self._lock:
            Container._live.add(self)
            for root in _cgroup_roots():
                cg = root / self.name
                cg.mkdir()  # fails if the name is taken: never share a cgroup
                self._cgroups.append(cg)
            fd, log = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
            self.log_path = Path(log)
            # The shell joins the cgroups, then execs nspawn (same pid). pdeathsig
            # fires when the *thread* that forked exits, so only from the main thread.
            script = 'for f in $CK_CGROUP_PROCS; do echo $$ >"$f" || exit 125; done\n'
            script += 'unset CK_CGROUP_PROCS; exec "$@"'
            argv = ["sh", "-c", script, "ck-nspawn"]
            if (
                threading.current_thread() is threading.main_thread()
                and shutil.which("setpriv") is not None
            ):
                argv += ["setpriv", "--pdeathsig", "TERM", "--"]
            argv += self.nspawn_argv()
            env = dict(os.environ)
            env["CK_CGROUP_PROCS"] = " ".join(str(c / "cgroup.procs") for c in self._cgroups)
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=fd,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            finally:
                os.close(fd)

    def _wait_for_pid1(self, deadline: float) -> None:
        """Find nspawn's child that has exec'd systemd, then wait for its private bus."""
        assert self._proc is not None
        nspawn = self._proc.pid
        while True:
            self._check_alive()
            if not self.pid:
                self.pid = _child_named(nspawn, "systemd")
            if self.pid and os.path.exists(f"/proc/{self.pid}/root/run/systemd/private"):
                self._booted = True  # its manager is up, signal handlers included
                return
            if time.monotonic() > deadline:
                raise ContainerError(f"{self.name}: timed out waiting for systemd to start")
            time.sleep(0.02)

    def _wait_running(self, deadline: float) -> None:
        remaining = max(deadline - time.monotonic(), 0.1)
        try:
            r = self.systemctl("is-system-running", "--wait", check=False, timeout=remaining)
        except subprocess.TimeoutExpired:
            raise ContainerError(f"{self.name}: timed out waiting for boot to finish") from None
        state = r.stdout.strip()
        if state not in ("running", "degraded"):
            raise ContainerError(f"{self.name}: system state {state!r}: {r.stderr.strip()}", r)

    def _open_path_to_checkout(self) -> None:
        """Let unprivileged (DynamicUser=) workers reach the bound checkout.

        The directories above a bind mount are the container's own (on its tmpfs
        root), created at boot; some, like ``/root``, are mode 0700. Opening
        them for traversal changes nothing on the host.
        """
        root = checkout_root()
        if root is None:
            return
        tmpfs = Path(f"/proc/{self.pid}/root/").stat().st_dev
        for parent in root.parents:
            inside = Path(f"/proc/{self.pid}/root{parent}")
            stat = inside.stat()
            mode = stat.st_mode
            if parent != Path("/") and stat.st_dev == tmpfs and not mode & 0o001:
                inside.chmod((mode & 0o7777) | 0o001)

    def _show_checkout_through_private_tmp(self) -> None:
        """A checkout under /tmp would be hidden from PrivateTmp=yes services: bind it back.

        The drop-in applies to every service in this throwaway container only; the
        units under test stay exactly as generated.
        """
        root = checkout_root()
        if root is None or not any(root.is_relative_to(t) for t in ("/tmp", "/var/tmp")):
            return
        self.write_file(
            "/run/systemd/system/service.d/50-clusterkit-checkout.conf",
            f"# The checkout lives under a temporary directory; see clusterkit/container.py\n"
            f"[Service]\nBindReadOnlyPaths=-{root}\n",
        )
        # ... except for the user managers, which have no private /tmp and break in a
        # mount namespace of their own (user-runtime-dir@ mounts /run/user/UID for all).
        for unit in ("user-runtime-dir@.service", "user@.service"):
            self.write_file(
                f"/run/systemd/system/{unit}.d/50-clusterkit-checkout.conf",
                "[Service]\nBindReadOnlyPaths=\n",
            )
        self.systemctl("daemon-reload")

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise ContainerError(f"{self.name}: systemd-nspawn exited ({self._proc.returncode})")

    @property
    def nspawn_pid(self) -> int:
        """The pid of ``systemd-nspawn`` on the host (0 before start)."""
        return self._proc.pid if self._proc is not None else 0

    @property
    def running(self) -> bool:
        """True while nspawn runs."""
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """The container's console output so far (boot and shutdown messages)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # drop colours
        return text if len(text) <= _LOG_TAIL else "…" + text[-_LOG_TAIL:]

    def poweroff(self, timeout: float = 30) -> None:
        """Shut down cleanly (SIGRTMIN+3 to PID 1), or kill on timeout; then clean up.

        Idempotent, and safe to call on a container that never booted.
        """
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                try:
                    # Before systemd has its signal handlers, SIGRTMIN+3 to a pid
                    # namespace's init is silently dropped: kill a half-booted one.
                    if not self._booted:
                        raise subprocess.TimeoutExpired(proc.args, 0)
                    os.kill(self.pid, signal.SIGRTMIN + 3)
                    proc.wait(timeout)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    self._kill()
                    proc.wait(10)
            self._kill_cgroup_leftovers()
            for cg in self._cgroups:
                _rmtree_cgroup(cg)
            self._cgroups.clear()
            if self.log_path is not None:
                self.log_path.unlink(missing_ok=True)
            self.pid = 0
            self._booted = False
            Container._live.discard(self)

    def _kill(self) -> None:
        """SIGKILL the container's PID 1 (which ends its pid namespace), then nspawn's group."""
        assert self._proc is not None
        if self.pid:
            _signal(self.pid, signal.SIGKILL)
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _kill_cgroup_leftovers(self) -> None:
        """SIGKILL whatever is still in the cgroups we created (only our descendants)."""
        for _ in range(50):
            pids = {p for cg in self._cgroups for p in _cgroup_pids(cg)}
            if not pids:
                return
            for p in pids:
                _signal(p, signal.SIGKILL)
            time.sleep(0.05)

    def __enter__(self) -> Container:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.poweroff()

    # -- commands inside -----------------------------------------------------------

    def _require_pid(self) -> int:
        if not self.pid or not self.running:
            raise ContainerError(f"{self.name}: not running")
        return self.pid

    def run(
        self,
        *argv: str,
        check: bool = False,
        timeout: float = 60,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container (all its namespaces) with a clean environment."""
        r = _run_group(self._inside(argv, env), timeout=timeout, input=input)
        r.args = list(argv)
        if check and r.returncode != 0:
            raise ContainerError(_describe(self.name, r), r)
        return r

    def popen(self, *argv: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        """Start ``argv`` inside, its stdout a text pipe; end it with :func:`stop_process`."""
        return subprocess.Popen(
            self._inside(argv, env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            cwd="/",  # never the caller's directory
        )

    def _inside(self, argv: Sequence[str], env: Mapping[str, str] | None) -> list[str]:
        envs = {"PATH": CONTAINER_PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        cmd = ["nsenter", "--all", "-t", str(self._require_pid()), "env", "-i"]
        return cmd + [f"{k}={v}" for k, v in envs.items()] + list(argv)

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS`` inside; raises ContainerError on failure unless ``check=False``."""
        argv = Manager(container_pid=self._require_pid()).systemctl_argv(*args)
        return self.run(*argv, check=check, timeout=timeout)

    def journal(self, *args: str) -> list[dict[str, object]]:
        """Journal entries inside, parsed from ``journalctl -o json ARGS``."""
        r = self.run("journalctl", "--no-pager", "-o", "json", *args, check=True)
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file at absolute ``path`` inside the container, creating parents."""
        if not path.startswith("/"):
            raise ValueError(f"container path must be absolute: {path!r}")
        target = Path(f"/proc/{self._require_pid()}/root{path}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def install_units(self, files: Iterable[Path], unit_dir: str = "/run/systemd/system") -> None:
        """Copy unit files into ``unit_dir`` inside, then ``daemon-reload``."""
        for f in files:
            f = Path(f)
            self.write_file(f"{unit_dir.rstrip('/')}/{f.name}", f.read_text())
        self.systemctl("daemon-reload")

    # -- the container's network ---------------------------------------------------

    def socket(
        self, family: int = _socket.AF_INET, type: int = _socket.SOCK_STREAM
    ) -> _socket.socket:
        """A new socket in the container's network namespace, usable from any thread.

        A socket belongs to the namespace it was created in, so a short-lived thread
        joins the container's namespace, creates it, and exits.
        """
        pid = self._require_pid()
        box: list[_socket.socket | BaseException] = []

        def make() -> None:
            try:
                fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
                try:
                    _setns_net(fd)
                finally:
                    os.close(fd)
                box.append(_socket.socket(family, type))
            except BaseException as exc:
                box.append(exc)

        t = threading.Thread(target=make, name=f"{self.name}-netns")
        t.start()
        t.join()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def http_get(
        self, port: int, path: str = "/", host: str = "127.0.0.1", timeout: float = 5
    ) -> tuple[int, str]:
        """One real HTTP/1.1 GET to ``host:port`` as seen inside the container: (status, body)."""
        sock = self.socket(_socket.AF_INET6 if ":" in host else _socket.AF_INET)
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
            conn.sock = sock
            conn.request("GET", path, headers={"Connection": "close"})
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()
            sock.close()

    def netns_run(
        self,
        *argv: str,
        check: bool = False,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a *host* command (curl, wrk, …) in the container's network namespace only."""
        cmd = ["nsenter", "-t", str(self._require_pid()), "-n", "--", *argv]
        r = _run_group(cmd, timeout=timeout, input=input)
        r.args = list(argv)
        if check and r.returncode != 0:
            raise ContainerError(_describe(self.name, r), r)
        return r


def _describe(name: str, r: subprocess.CompletedProcess[str]) -> str:
    out = (r.stdout or "").strip()[-2000:]
    err = (r.stderr or "").strip()[-2000:]
    return f"{name}: {r.args!r} exited {r.returncode}\nstdout: {out}\nstderr: {err}"


def _stat(pid: int | str) -> tuple[str, int, int] | None:
    """(comm, ppid, pgrp) of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses
    fields = stat[stat.rindex(")") + 2 :].split()
    return stat[stat.index("(") + 1 : stat.rindex(")")], int(fields[1]), int(fields[2])


def _all_pids() -> list[int]:
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]


def _child_named(ppid: int, comm: str) -> int:
    """The pid of a child of ``ppid`` whose command name is ``comm``, or 0."""
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None and st[0] == comm and st[1] == ppid:
            return pid
    return 0


def _pids_in_group(pgrp: int) -> list[int]:
    return [pid for pid in _all_pids() if (st := _stat(pid)) is not None and st[2] == pgrp]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _cgroup_pids(cg: Path) -> set[int]:
    pids: set[int] = set()
    for procs in cg.rglob("cgroup.procs"):
        try:
            pids.update(int(p) for p in procs.read_text().split())
        except OSError:
            pass
    return pids


def _rmtree_cgroup(cg: Path) -> None:
    """Remove a cgroup and the sub-cgroups systemd made in it, deepest first."""
    for _ in range(100):
        if not cg.exists():
            return
        dirs = sorted((d for d in cg.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts))
        try:
            for d in [*dirs, cg]:
                d.rmdir()
            return
        except FileNotFoundError:
            continue
        except OSError:  # EBUSY: a process is still leaving
            time.sleep(0.05)
    raise ContainerError(f"could not remove cgroup {cg}")


@atexit.register
def _poweroff_all() -> None:
    """Safety net: never leave a container running after the interpreter exits."""
    for c in list(Container._live):
        try:
            c.poweroff(timeout=10)
        except Exception:
            pass
