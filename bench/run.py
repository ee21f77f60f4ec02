"""Benchmark clusterkit against Node's cluster module, pm2, gunicorn and uvicorn.

    .venv/bin/python bench/run.py                 # 3 runs, 10 s loads, every system
    .venv/bin/python bench/run.py --quick         # 1 run, 3 s loads (a smoke test)
    .venv/bin/python bench/run.py --only node-cluster-rr uvicorn --runs 5

Writes bench/RESULTS.md, bench/results.png and bench/results.json (raw per-run numbers).
See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import measure, procfs, report  # noqa: E402
from bench.systems import BASELINE, REFERENCES, SYSTEMS  # noqa: E402
from bench.systems.base import NPROC, REGISTRY, ROOT, System  # noqa: E402

RUNNING: list[System] = []
#: the serve_asyncio rows: the crash-loop back-off is the units', whatever the server
CRASH_LOOP_SYSTEMS = ("clusterkit-shared", "clusterkit-reuseport")
#: the throughput targets' comparisons, each measured again with the loads alternating within
#: rounds: the systems of a group run side by side (the first on the host's port 3000, so
#: one host-port system per group), and each round loads each of them in turn with each of
#: report.INTERLEAVED_LOADS. A group's REFERENCES join it whenever its systems all run.
INTERLEAVED_GROUPS = (
    (BASELINE, "clusterkit-shared", "clusterkit-reuseport", "clusterkit-floor"),
    ("uvicorn", "clusterkit-asgi"),
)
#: where the machine has too few CPUs to pin wrk apart from N workers: serve_asyncio's group
#: again with one worker per system, the servers on CPU 0 and wrk on the others (measure.Pinned)
PINNED_GROUP = (BASELINE, "clusterkit-shared", "clusterkit-reuseport", "clusterkit-floor")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def port_free(host: str, port: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
        time.sleep(0.05)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def started(name: str, workers: int) -> tuple[System, float]:
    system = (SYSTEMS.get(name) or REFERENCES[name])()
    if system.netns_pid is None and not port_free(system.host, system.port):
        raise RuntimeError(f"{system.host}:{system.port} is in use; cannot start {name}")
    RUNNING.append(system)
    return system, system.start(workers)


def stop(system: System) -> None:
    system.stop()
    if system in RUNNING:
        RUNNING.remove(system)


@contextlib.contextmanager
def all_started(
    names: list[str], workers: int, pinned: measure.Pinned | None = None
) -> Iterator[list[System]]:
    """The systems ``names``, started (pinned, if so) and warmed up by a 1 s load together,
    stopped at the end.

    Started last first: started() refuses a host port in use, and a system in a container
    of its own (clusterkit) is on the host's network until it boots.
    """
    systems: list[System] = []
    try:
        for name in reversed(names):
            system, _ = started(name, workers)
            systems.insert(0, system)
            if pinned:
                pinned.pin(system)
            measure.wrk(system, 1, close=False, pinned=pinned)  # warm-up, not recorded
        yield systems
    finally:
        for system in systems:
            stop(system)


def measure_rounds(
    names: list[str],
    rounds: int,
    seconds: float,
    workers: int,
    pinned: measure.Pinned | None = None,
) -> dict:
    """{load: {system: [per-round wrk results]}}: the systems started together, and each
    round runs one load against each of them in turn, keep-alive then new connection."""
    loads = report.INTERLEAVED_LOADS.values()
    out: dict = {load: {name: [] for name in names} for load, _ in loads}
    with all_started(names, workers, pinned) as systems:
        for i in range(rounds):
            for load, close in loads:
                for system in systems:
                    r = measure.wrk(system, seconds, close, pinned)
                    out[load][system.name].append(r)
                    log(f"  round {i + 1}/{rounds} {load} {system.name}: {r['rps']:,.0f} req/s")
    return out


def group_record(names: list[str], workers: int, pinned: measure.Pinned | None) -> dict:
    """An interleaved group's record, as report.py reads it: its systems and, if it was
    pinned, how (its results, or its error, are added to it)."""
    record: dict = {"names": list(names)}
    references = {n: REFERENCES[n]().summary for n in names if n in REFERENCES}
    if references:  # described here: a reference has no run of its own to carry it
        record["references"] = references
    if pinned:
        record["pinned"] = {"workers": workers, "description": pinned.describe()}
    return record


def interleaved(
    names: list[str], rounds: int, seconds: float, workers: int, pinned: measure.Pinned | None
) -> list[dict]:
    """INTERLEAVED_GROUPS (those whose systems are all in *names*), measured in rounds; then,
    if *pinned*, PINNED_GROUP with one worker per system, pinned so."""
    plan = [(group, workers, None) for group in INTERLEAVED_GROUPS]
    if pinned:
        plan.append((PINNED_GROUP, 1, pinned))
    groups = []
    for group, n, pin in plan:
        if rounds < 1 or not all(name in names or name in REFERENCES for name in group):
            continue
        log(f"interleaved: {', '.join(group)}, {n} worker(s), {rounds} rounds")
        entry = group_record(list(group), n, pin)
        try:
            entry["results"] = measure_rounds(list(group), rounds, seconds, n, pin)
        except Exception as e:  # noqa: BLE001 - reported, the rest of the run is kept
            log(f"  interleaved {group} failed: {e!r}")
            traceback.print_exc(limit=5)
            entry["error"] = repr(e)
        groups.append(entry)
    return groups


def healthy(system: System, workers: int) -> System:
    """Restart the system if it lost a worker for good (e.g. Node's seed after SIGKILL)."""
    if len(system.worker_pids()) == workers:
        return system
    log(f"  {system.name}: {len(system.worker_pids())}/{workers} workers, restarting it")
    stop(system)
    RUNNING.append(system)
    system.start(workers)
    return system


def guarded(out: dict, key: str, fn) -> None:
    try:
        out[key] = fn()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a failed measurement is reported, the run goes on
        log(f"  {key} failed: {e!r}")
        traceback.print_exc(limit=3)
        out[key] = {"error": repr(e)}


def run_system(name: str, workers: int, seconds: float, fair_seconds: float) -> dict:
    r: dict = {}
    system, r["start_s"] = started(name, workers)
    r["commands"] = {}
    try:
        log(f"  {name}: {workers} workers serving after {r['start_s']:.3f}s")
        measure.wrk(system, 1, close=False)  # warm-up, not recorded
        guarded(r, "keepalive", lambda: measure.wrk(system, seconds, close=False))
        guarded(r, "newconn", lambda: measure.wrk(system, seconds, close=True))
        guarded(r, "memory", lambda: measure.memory_mib(system))
        guarded(r, "fair_newconn", lambda: measure.fairness(system, fair_seconds, False, 4))
        guarded(r, "fair_keepalive", lambda: measure.fairness(system, fair_seconds, True, 8))
        guarded(r, "respawn", lambda: measure.respawn_time(system))
        healthy(system, workers)
        guarded(r, "avail_kill", lambda: measure.avail_kill(system))
        healthy(system, workers)
        guarded(r, "avail_reload", lambda: measure.avail_reload(system))
        healthy(system, workers)
        guarded(r, "avail_restart", lambda: measure.avail_restart(system))
        if name in CRASH_LOOP_SYSTEMS:
            healthy(system, workers)
            guarded(r, "crash_loop", lambda: measure.crash_loop(system))
        r["commands"] = dict(system.commands)
        r["versions"] = system.versions()
        r["description"] = system.description
    finally:
        stop(system)
    if workers > 1:
        one = None

        def scaling() -> dict:
            nonlocal one
            one, _ = started(name, 1)
            return measure.wrk(one, seconds, close=False)

        try:
            guarded(r, "keepalive_1worker", scaling)
        finally:
            if one is not None:
                stop(one)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs per system (median taken)")
    p.add_argument("--duration", type=float, default=10, help="seconds per wrk load (<= 10)")
    p.add_argument("--workers", type=int, default=NPROC, help="workers (default: CPU count)")
    p.add_argument("--only", nargs="+", choices=list(SYSTEMS), help="systems to run")
    p.add_argument("--quick", action="store_true", help="1 run, 3 s loads, 1 interleaved round")
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds of interleaved loads for the throughput targets (0: none)",
    )
    p.add_argument(
        "--out",
        help="directory for RESULTS.md/results.png/json (default: bench/ for a full run of "
        "every system, else bench/work/partial/, so a smoke test never overwrites the results)",
    )
    p.add_argument(
        "--report-only", metavar="JSON", help="rewrite RESULTS.md/results.png from a results.json"
    )
    a = p.parse_args(argv)
    full = not (a.quick or a.only) and a.runs >= 3 and a.duration >= 10 and a.rounds >= 5
    a.out = a.out or (ROOT if full or a.report_only else os.path.join(ROOT, "work", "partial"))
    os.makedirs(a.out, exist_ok=True)
    if a.report_only:
        with open(a.report_only) as f:
            data = json.load(f)
        report.write(a.out, data["meta"], data["runs"], data.get("interleaved", []))
        return 0
    if a.runs < 1 or a.rounds < 0 or a.duration < 1:
        p.error("--runs: at least 1; --rounds: 0 or more; --duration: at least 1 s")
    if a.quick:
        a.runs, a.duration, a.rounds = 1, 3, min(a.rounds, 1)
    a.duration = min(a.duration, 10)
    fair_seconds = min(a.duration, 5)
    names = a.only or list(SYSTEMS)
    if BASELINE not in names:
        names.insert(0, BASELINE)  # every figure is a ratio to it

    load_at_start = procfs.load_average()
    cpus = os.cpu_count() or 1
    pinned = None
    if cpus >= a.workers + 2:  # wrk's 2 threads get CPUs of their own
        spare = ",".join(str(c) for c in range(a.workers, cpus))
        measure.PIN_LOAD[:] = ["taskset", "-c", spare]
        pinning = (
            f"wrk pinned to CPUs {spare} (`taskset`); the servers' {a.workers} workers are not "
            "pinned, but have the other CPUs free of wrk only as far as the scheduler keeps them so"
        )
    else:
        pinning = (
            f"none: {cpus} CPUs for {a.workers} workers and wrk's {measure.WRK_THREADS} threads; "
            "pinning wrk apart would take a CPU from the servers, so wrk and the servers share "
            "every CPU"
        )
        if cpus >= 2:
            pinned = measure.Pinned.on(cpus)
            pinning += (
                f"; serve_asyncio's group is also measured with 1 worker per system and "
                f"{pinned.describe()}"
            )

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    groups: list[dict] = []
    began = datetime.datetime.now(datetime.UTC)
    try:
        for i in range(a.runs):  # systems interleaved, so slow drift hits all of them alike
            for name in names:
                log(f"run {i + 1}/{a.runs}: {name}")
                try:
                    runs[name].append(run_system(name, a.workers, a.duration, fair_seconds))
                except Exception as e:  # noqa: BLE001 - reported, the other systems still run
                    log(f"  {name} failed: {e!r}")
                    traceback.print_exc(limit=5)
                    runs[name].append({"run": {"error": repr(e)}})
        groups = interleaved(names, a.rounds, a.duration, a.workers, pinned)
    except KeyboardInterrupt:
        log("interrupted: stopping everything started")
        return 130
    finally:
        for system in list(RUNNING):
            try:
                stop(system)
            except Exception as e:  # noqa: BLE001
                log(f"stop {system.name}: {e!r}")
        REGISTRY.kill_all()
    meta = report.machine_meta()
    meta.update(
        date=began.strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join([".venv/bin/python", "bench/run.py", *(argv or sys.argv[1:])]),
        runs=a.runs,
        rounds=a.rounds,
        duration=a.duration,
        fair_seconds=fair_seconds,
        workers=a.workers,
        load_avg_at_start=load_at_start,
        pinning=pinning,
        wrk=" ".join(measure.PIN_LOAD + ["wrk"])
        + f" -t{measure.WRK_THREADS} -c{measure.WRK_CONNECTIONS} -d{round(a.duration)}s "
        "--latency [-H 'Connection: close'] http://127.0.0.1:3000/",
    )
    os.makedirs(a.out, exist_ok=True)
    data = {"meta": meta, "runs": runs, "interleaved": groups}
    text = json.dumps(data, indent=1, default=str)
    checkout = os.path.dirname(ROOT)  # no absolute path of this machine: the checkout is `.`
    text = text.replace(checkout + "/", "").replace(checkout, ".")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        f.write(text + "\n")
    report.write(a.out, meta, runs, groups)
    log(f"wrote {os.path.join(a.out, 'RESULTS.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
