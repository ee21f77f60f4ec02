"""The one systemd client: which service manager, and how to talk to it.

A :class:`Manager` is where a cluster's units live and run: the host's system
manager (units in ``/etc/systemd/system``, or ``/run/systemd/system`` with
``runtime``), a user's manager (``systemctl --user``), or the system manager
of the throwaway container that ``clusterkit up`` boots (reached with
``nsenter`` into its PID 1; its journal read from its root through ``/proc``).
A remote host would be one more way to build the command line. Nothing else in
clusterkit runs ``systemctl``.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: PATH for commands run inside a container (``env -i`` drops the caller's).
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: how long past its own TimeoutStopSec= (TimeoutStartSec=) a unit may still be stopping
#: (starting) before :meth:`Manager.systemctl_bounded` kills it
OVERDUE_MARGIN_S = 5.0
_TIMESPAN_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_TIMESPAN_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(us|ms|s|min|h|d)")
log = logging.getLogger("clusterkit.manager")


def user_runtime_dir() -> Path:
    """The calling user's runtime directory ($XDG_RUNTIME_DIR), where its manager runs."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}")


def user_config_dir() -> Path:
    """The calling user's configuration directory ($XDG_CONFIG_HOME)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


class ManagerError(Exception):
    """systemd refused, or is not reachable; the message says what to do."""


@dataclass(frozen=True)
class Manager:
    """A systemd service manager: ``system`` or ``user``, on the host or in a container."""

    scope: str = "system"  # "system" or "user"
    runtime: bool = False  # units under /run (gone at reboot), not /etc or ~/.config
    container_pid: int | None = None  # PID 1 of the container `up` runs, seen from the host

    @property
    def user(self) -> bool:
        return self.scope == "user"

    def describe(self) -> str:
        where = f" in the container of pid {self.container_pid}" if self.container_pid else ""
        return f"the {'user' if self.user else 'system'} service manager{where}"

    # ---- where units live ----

    @property
    def root(self) -> Path:
        """The file system the manager sees: ``/``, or the container's through /proc."""
        return Path(f"/proc/{self.container_pid}/root") if self.container_pid else Path("/")

    @property
    def unit_dir(self) -> Path:
        if self.user:
            base = user_runtime_dir() if self.runtime else user_config_dir()
            return base / "systemd" / "user"
        return self.root / ("run" if self.runtime else "etc") / "systemd" / "system"

    @property
    def generator_dir(self) -> Path | None:
        # A user's manager reads no generators from a directory of its own.
        return None if self.user else Path(f"{self.unit_dir}-generators")

    @property
    def journal_directory(self) -> str | None:
        """Where to read this manager's journal from; None: the local one."""
        if not self.container_pid:
            return None
        persistent = self.root / "var" / "log" / "journal"
        return str(persistent if persistent.is_dir() else self.root / "run" / "log" / "journal")

    def is_running(self) -> bool:
        if self.user:
            runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
            return Path(runtime, "systemd", "private").exists()
        return (self.root / "run" / "systemd" / "system").is_dir()

    # ---- running commands there ----

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command line that runs where this manager runs."""
        if self.container_pid:
            inside = ["nsenter", "--all", "-t", str(self.container_pid), "env", "-i"]
            return [*inside, f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", *argv]
        return list(argv)

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` there; its output and status come back."""
        try:
            return subprocess.run(
                self.command(argv),
                capture_output=True,
                text=True,
                errors="replace",  # a worker's log lines are any bytes: never a traceback
                timeout=timeout,
                cwd="/",
            )
        except FileNotFoundError as e:
            raise ManagerError(f"{e.filename}: not found (is systemd installed?)") from None

    def systemctl_argv(self, *args: str) -> list[str]:
        """The ``systemctl`` command line for this manager (run it with :meth:`command`)."""
        return ["systemctl", *(["--user"] if self.user else []), "--no-pager", *args]

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        """``systemctl ARGS`` for this manager; ManagerError with systemd's words on failure."""
        argv = self.systemctl_argv(*args)
        r = self.run(*argv, timeout=timeout)
        if check:
            _check(argv, r.returncode, r.stdout, r.stderr)
        return r.stdout

    def systemctl_bounded(self, *args: str, units: Sequence[str], check: bool = True) -> list[str]:
        """``systemctl ARGS``, a start, stop or restart of ``units`` (names or patterns), waited for
        as long as it takes; meanwhile a unit still stopping (starting) past its own
        TimeoutStopSec= (TimeoutStartSec=) and OVERDUE_MARGIN_S is killed: SIGKILL to every
        process of it. Returns the units killed.

        Those timeouts bind a worker only until it sends EXTEND_TIMEOUT_USEC= (sd_notify(3)),
        which it may repeat for ever: systemd then never kills it, and a stop, and whoever
        waits for it, would wait for ever.
        """
        argv = self.systemctl_argv(*args)
        proc = subprocess.Popen(
            self.command(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"
        )
        killed: list[str] = []
        while True:
            try:
                out, err = proc.communicate(timeout=1)
                break
            except subprocess.TimeoutExpired:
                late = [(u, s) for u, s in self._overdue(units) if u not in killed]
                if late:
                    self.systemctl(
                        "kill",
                        "--kill-who=all",
                        "--signal=SIGKILL",
                        *(u for u, _ in late),
                        check=False,
                    )
                for unit, state in late:
                    log.warning(
                        "%s was still %s past its Timeout%sSec= (systemd never kills a worker "
                        "that keeps asking for more time, EXTEND_TIMEOUT_USEC=): killed it "
                        "(SIGKILL)",
                        unit,
                        state,
                        "Stop" if state == "stopping" else "Start",
                    )
                    killed.append(unit)
        if check:
            _check(argv, proc.returncode, out, err)
        return killed

    def _overdue(self, units: Sequence[str]) -> list[tuple[str, str]]:
        """(unit, "stopping" or "starting") of ``units`` in that state past its timeout."""
        listed = self.systemctl(
            "list-units", "--state=activating,deactivating", "--plain", "--no-legend", *units,
            check=False,
        )  # fmt: skip
        names = [line.split()[0] for line in listed.splitlines() if line.strip()]
        props = (
            "ActiveState",
            "StateChangeTimestampMonotonic",
            "TimeoutStartUSec",
            "TimeoutStopUSec",
        )
        now = time.monotonic()  # CLOCK_MONOTONIC, as systemd's *Monotonic timestamps
        late = []
        for name, row in zip(names, self.show(names, props), strict=True):
            stopping = row["ActiveState"] == "deactivating"
            limit = _timespan_s(row["TimeoutStopUSec" if stopping else "TimeoutStartUSec"])
            since = int(row["StateChangeTimestampMonotonic"] or 0) / 1e6
            if limit is not None and since and now - since > limit + OVERDUE_MARGIN_S:
                late.append((name, "stopping" if stopping else "starting"))
        return late

    def show(self, units: Iterable[str], properties: Sequence[str]) -> list[dict[str, str]]:
        """``systemctl show`` of each unit: one dict of the asked properties per unit.

        systemctl leaves out empty lists even with ``--all``; ``Id`` is never
        empty, so asking for it too keeps one block per unit.
        """
        units = list(units)
        if not units:
            return []
        asked = ",".join(dict.fromkeys(["Id", *properties]))
        out = self.systemctl("show", "-p", asked, *units)
        blocks = out.strip("\n").split("\n\n")
        parsed = [dict(ln.split("=", 1) for ln in b.splitlines() if "=" in ln) for b in blocks]
        return [{p: block.get(p, "") for p in properties} for block in parsed]


def _check(argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
    if returncode != 0:
        detail = (stderr or stdout).strip().splitlines()
        raise ManagerError(f"{' '.join(argv)} failed: {detail[-1] if detail else returncode}")


def _timespan_s(text: str) -> float | None:
    """A timespan as ``systemctl show`` prints it (``1min 30s``, ``500ms``) in seconds;
    None for ``infinity`` (or anything else)."""
    total = 0.0
    for part in text.split() or ["-"]:
        m = _TIMESPAN_PART.fullmatch(part)
        if m is None:
            return None
        total += float(m.group(1)) * _TIMESPAN_UNITS[m.group(2)]
    return total


# ---- finding a cluster: installed on the host, or run by `clusterkit up` ----

#: where `up` says which container runs which cluster (root's only)
UP_REGISTRY = Path("/run/clusterkit/up")


def _started_at(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat's 22nd field),
    if it runs as root: with its pid, what names one process for good."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != 0:
            return None
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[19] if len(fields) > 19 else None


def register_up(name: str, container_pid: int) -> None:
    """Say that the container whose PID 1 is ``container_pid`` runs cluster ``name``."""
    from clusterkit import unitfiles

    UP_REGISTRY.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(UP_REGISTRY.parent, 0o755)
    record = f"{container_pid} {_started_at(container_pid)}\n"
    unitfiles.atomic_write(UP_REGISTRY / name, record, mode=0o600)


def unregister_up(name: str) -> None:
    (UP_REGISTRY / name).unlink(missing_ok=True)


def up_manager(name: str) -> Manager | None:
    """The manager of the container `up` runs cluster ``name`` in, if it is still running."""
    path = UP_REGISTRY / name
    try:
        info = path.lstat()
        pid, started = path.read_text().split()
        comm = Path(f"/proc/{int(pid)}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    # Only root's record, of the very process it names: the record outlives an `up` that
    # was killed, and its pid may belong to anything now, even a user's own "systemd"
    # (whose journal and namespaces root's commands would then use).
    if info.st_uid != 0 or info.st_mode & 0o077 or comm != "systemd":
        return None
    if _started_at(int(pid)) != started:
        return None
    return Manager(container_pid=int(pid))


def running_ups() -> dict[str, Manager]:
    """Every cluster `up` runs now: name -> its container's manager."""
    found = {}
    for path in sorted(UP_REGISTRY.glob("*")) if UP_REGISTRY.is_dir() else []:
        manager = up_manager(path.name)
        if manager is not None:
            found[path.name] = manager
    return found


def find(name: str, *, user: bool = False) -> Manager | None:
    """Where cluster ``name`` is: installed in this host's manager, or run by `up`; else None."""
    host = Manager("user" if user else "system")
    if host.is_running() and knows(host, name):
        return host
    return None if user else up_manager(name)


def knows(manager: Manager, name: str) -> bool:
    """True when ``manager`` has the unit files of cluster ``name``."""
    service = f"{name}@.service"
    return bool(manager.systemctl("list-unit-files", "--no-legend", service, check=False).strip())
