"""Measurements. Each takes a started System and returns plain numbers (dict)."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import procfs
from bench.client import Load, SockDiag, attributed_request, run_in_netns
from bench.systems.base import NotSupported, System

WRK_THREADS = 2
WRK_CONNECTIONS = 64
#: a `taskset -c CPUS` prefix for wrk, set by run.py where the machine has CPUs to spare
PIN_LOAD: list[str] = []
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Pinned:
    """Loads run with the servers on *server_cpus* and wrk, one thread, on *load_cpus*: on a
    machine with too few CPUs to pin wrk apart from N workers, the servers measured alone."""

    server_cpus: tuple[int, ...]
    load_cpus: tuple[int, ...]

    @classmethod
    def on(cls, cpus: int) -> Pinned:
        """The servers on CPU 0, wrk on the others."""
        return cls((0,), tuple(range(1, cpus)))

    def taskset(self) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, self.load_cpus))]

    def pin(self, system: System) -> None:
        """Every thread of every process of *system* onto server_cpus (a thread started
        later inherits the mask of the thread that starts it)."""
        for pid in system.pids():
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(int(tid), self.server_cpus)

    def describe(self) -> str:
        cpus = ",".join(map(str, self.server_cpus))
        return f"every thread of the servers on CPU {cpus}, `{' '.join(self.taskset())} wrk -t1`"


def wrk_argv(
    system: System,
    seconds: float,
    close: bool,
    connections: int = WRK_CONNECTIONS,
    pinned: Pinned | None = None,
) -> list[str]:
    argv = [
        "wrk",
        f"-t{1 if pinned else WRK_THREADS}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    pin = pinned.taskset() if pinned else PIN_LOAD
    return [*system.load_prefix(), *pin, *argv, f"http://{system.host}:{system.port}/"]


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    return {"rps": rps, "p99_ms": p99, "requests": total, "errors": errors}


def wrk(system: System, seconds: float, close: bool, pinned: Pinned | None = None) -> dict:
    """wrk's figures, plus the CPU time per request of the system (every process counted in
    its memory) and of wrk itself, in microseconds. Unlike throughput, these do not depend
    on how the CPUs were shared between the servers and the load generator."""
    argv = wrk_argv(system, seconds, close, pinned=pinned)
    pids = system.pids()
    before = {pid: (procfs.starttime(pid), procfs.cpu_ticks(pid)) for pid in pids}
    load_before = _children_cpu_s()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 15)
    load_s = _children_cpu_s() - load_before  # wrk (and nsenter, which waited for it)
    # a process that ended meanwhile is left out: its last ticks cannot be read
    ticks = sum(
        procfs.cpu_ticks(pid) - t for pid, (start, t) in before.items() if procfs.alive(pid, start)
    )
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed: {r.stderr}")
    res = parse_wrk(r.stdout)
    res["command"] = " ".join(argv)
    n = res["requests"]
    res["server_cpu_us"] = ticks / _TICKS_PER_S / n * 1e6 if n else None
    res["load_cpu_us"] = load_s / n * 1e6 if n else None
    return res


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's waited-for children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def memory_mib(system: System) -> dict:
    pids = system.pids()
    out: dict = {
        "pss_mib": sum(procfs.pss_kib(p) for p in pids) / 1024,
        "processes": len(pids),
    }
    extra = system.memory_not_counted()
    if extra:
        out["not_counted_mib"] = extra
    return out


def fairness(system: System, seconds: float, keepalive: bool, conns: int) -> dict:
    """Requests served per worker at a moderate load (our Python client, `conns` threads).

    keepalive=False: a new connection per request. keepalive=True: `conns` persistent
    connections (reopened only if the server closes them). Each connection is attributed to
    the worker that accepted it (see bench/client.py), so the servers are not changed.
    """
    load = Load(
        system.host,
        system.port,
        keepalive_threads=conns if keepalive else 0,
        close_threads=0 if keepalive else conns,
        netns_pid=system.netns_pid,
        workers=system.worker_pids,
        max_seconds=seconds,
    ).start()
    time.sleep(seconds)
    load.stop()
    counts = [load.per_worker.get(p, 0) for p in system.worker_pids()]
    total = sum(counts)
    if not counts or total == 0:
        return {"busiest_share": None, "max_over_mean": None}
    return {
        "busiest_share": max(counts) / total,
        "max_over_mean": max(counts) / statistics.mean(counts),
        "counts": sorted(counts, reverse=True),
        "failed": sum(load.failures.values()),
        "unattributed": load.unattributed,
    }


def respawn_time(system: System, timeout: float = 10.0, worker_pid: int | None = None) -> dict:
    """SIGKILL one worker (*worker_pid*, else the system's choice; no load), then send requests
    on new connections until one is served by a worker pid that did not exist before the kill.
    None if that never happens."""
    if not system.respawns:
        return {"respawn_s": None}
    before = set(system.worker_pids())
    killed: list[int] = []

    def probe() -> float | None:
        diag = SockDiag()
        try:
            t0 = time.monotonic()
            killed.append(system.kill_one_worker(worker_pid))
            while time.monotonic() - t0 < timeout:
                pid, fail = attributed_request(
                    system.host, system.port, system.worker_pids, diag, 1.0
                )
                if pid is not None and fail is None and pid not in before:
                    return time.monotonic() - t0
                time.sleep(0.002)
            return None
        finally:
            diag.close()

    seconds = run_in_netns(system.netns_pid, probe)
    system.wait_workers(set(killed))
    return {"respawn_s": seconds}


AVAIL_KEEPALIVE_THREADS = 4
AVAIL_CLOSE_THREADS = 4


def availability(
    system: System, action: Callable[[], object], settle: float = 1.0, max_seconds: float = 10.0
) -> dict:
    """Run the client load (4 keep-alive + 4 new-connection threads), do `action` after `settle`
    seconds, keep the load `settle` seconds after the action returned, count failures."""
    load = Load(
        system.host,
        system.port,
        keepalive_threads=AVAIL_KEEPALIVE_THREADS,
        close_threads=AVAIL_CLOSE_THREADS,
        netns_pid=system.netns_pid,
        max_seconds=max_seconds,
    ).start()
    try:
        time.sleep(settle)
        t0 = time.monotonic()
        action()
        action_s = time.monotonic() - t0
        time.sleep(settle)
    finally:
        load.stop()
    failures = dict(load.failures)
    return {
        "failed": sum(failures.values()),
        "failures": failures,
        # of the failures, those on a reused keep-alive connection with no byte of response
        # (a client library would typically retry these GETs on a new connection)
        "reused_no_response": load.reused_no_response,
        "ok": load.ok,
        # the slowest request during the whole load (the action included), and how many took
        # longer than bench.client.SLOW, by outcome
        "max_latency_ms": load.max_latency * 1000,
        "slow": dict(load.slow),
        "action_s": action_s,
    }


def avail_kill(system: System) -> dict:
    def act() -> None:
        killed = system.kill_one_worker()
        if system.respawns:
            system.wait_workers({killed})

    return availability(system, act)


CRASH_LOOP_SECONDS = 30.0


def crash_loop(system: System, seconds: float = CRASH_LOOP_SECONDS) -> dict:
    """Worker 0 fails at every start for `seconds`, under the availability load: when systemd
    started it (PID 1's records), the state of its socket at the end, and the requests that
    failed meanwhile (the other workers serve). Systems without start_crash_loop: not measured."""
    if not hasattr(system, "start_crash_loop"):
        return {"failed": None, "note": "not measured"}
    record: dict = {}

    def act() -> None:
        t0 = system.start_crash_loop()
        time.sleep(seconds)
        record.update(system.crash_loop_record(t0))

    try:
        out = availability(system, act, max_seconds=seconds + 5)
    finally:
        system.end_crash_loop()
    starts = record.get("starts_s", [])
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return {
        **out,
        **record,
        "seconds": seconds,
        "starts": len(starts),
        "starts_per_min": len(starts) * 60 / seconds,
        # the pace the back-off settles at: the median of the last three gaps between starts
        "last_gap_s": statistics.median(gaps[-3:]) if gaps else None,
    }


def avail_reload(system: System) -> dict:
    try:
        return availability(system, system.rolling_reload)
    except NotSupported as e:
        return {"failed": None, "note": str(e) or "not supported"}


def avail_restart(system: System) -> dict:
    try:
        return availability(system, system.restart_all)
    except NotSupported as e:
        return {"failed": None, "note": str(e) or "not supported"}
