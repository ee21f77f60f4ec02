"""What the harness reads from /proc: process trees, memory (PSS), socket ownership.

/proc on the host also shows processes inside containers (with host pids), so every function
here works for a system running under systemd in a systemd-nspawn container too.
"""

from __future__ import annotations

import os


def load_average() -> list[str]:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg writes them."""
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def children(pid: int) -> list[int]:
    """Direct children of pid (all threads' children lists), [] if pid is gone."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return sorted(set(out))


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state, field 3)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()


def starttime(pid: int) -> int | None:
    """Start time in clock ticks since boot (field 22): with the pid, identifies a process."""
    f = stat_fields(pid)
    return int(f[19]) if f else None


def ppid(pid: int) -> int | None:
    """Parent pid (field 4), as seen from here (host pids for a container's processes)."""
    f = stat_fields(pid)
    return int(f[1]) if f else None


def alive(pid: int, start: int | None = None) -> bool:
    f = stat_fields(pid)
    if f is None or f[0] in ("Z", "X"):
        return False
    return start is None or int(f[19]) == start


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pss_kib(pid: int) -> int:
    """Proportional set size of one process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    f = stat_fields(pid)
    return int(f[11]) + int(f[12]) if f else 0


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets in pid's fd table."""
    out: set[int] = set()
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"{base}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out
