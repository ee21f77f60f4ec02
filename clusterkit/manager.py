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

import os
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: PATH for commands run inside a container (``env -i`` drops the caller's).
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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
            if self.runtime:
                base = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}")
                return base / "systemd" / "user"
            config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
            return config / "systemd" / "user"
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
                self.command(argv), capture_output=True, text=True, timeout=timeout, cwd="/"
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
        if check and r.returncode != 0:
            detail = (r.stderr or r.stdout).strip().splitlines()
            raise ManagerError(f"{' '.join(argv)} failed: {detail[-1] if detail else r.returncode}")
        return r.stdout

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
