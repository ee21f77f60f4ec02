"""Respawn after SIGKILL, sampled many times: what bench/run.py measures once per run.

    .venv/bin/python -m bench.respawn [--starts 4] [--out bench/RESPAWN.md] [--only NAME ...]

Starts each system as bench/run.py does (2 workers; clusterkit in a container), then SIGKILLs
each worker twice, in turn, and times every kill with the full run's probe
(``measure.respawn_time``: requests on new connections, no load, until a worker pid that did
not exist before the kill answers). Two crashes of a worker within 60 s are as many as
clusterkit's crash-loop back-off restarts without a wait; a third would wait 1 s. The systems
take turns start by start, so drift of the machine hits all alike. Reports each system's
median, lowest and highest, and the median as a ratio to `uvicorn --workers`, whose master
also starts a fresh interpreter for each worker (gunicorn forks a copy of an imported one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from bench import measure, report
from bench import run as bench_run
from clusterkit.unitfiles import atomic_write

SYSTEMS = (
    "clusterkit-shared",
    "clusterkit-reuseport",
    "clusterkit-asgi",
    "clusterkit-wsgi",
    "uvicorn",
    "gunicorn",
)
REFERENCE = "uvicorn"
KILLS_PER_WORKER = 2


def sample(name: str) -> list[float | None]:
    """Respawn times of KILLS_PER_WORKER kills of each worker of one fresh start of *name*."""
    system, _ = bench_run.started(name, 2)
    times: list[float | None] = []
    try:
        for i in range(KILLS_PER_WORKER * 2):
            victim = sorted(system.worker_pids())[i % 2]
            times.append(measure.respawn_time(system, worker_pid=victim)["respawn_s"])
    finally:
        bench_run.stop(system)
    return times


def table(times: dict[str, list[float | None]]) -> str:
    served = {name: [t for t in ts if t is not None] for name, ts in times.items()}
    reference = statistics.median(served[REFERENCE]) if served.get(REFERENCE) else None
    rows = [
        f"| system | median (s) | lowest | highest | ratio to {REFERENCE} | kills | never served |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ts in times.items():
        ok = served[name]
        if not ok:
            rows.append(f"| {name} | – | – | – | – | {len(ts)} | {len(ts)} |")
            continue
        m = statistics.median(ok)
        ratio = f"{m / reference:.2f}×" if reference else "–"
        rows.append(
            f"| {name} | {m:.3f} | {min(ok):.3f} | {max(ok):.3f} | {ratio} | "
            f"{len(ts)} | {len(ts) - len(ok)} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--starts", type=int, default=4, help="fresh starts of each system")
    p.add_argument("--only", nargs="+", choices=SYSTEMS, help="systems to sample")
    p.add_argument("--out", type=Path, help="also write the table, with this script's doc, here")
    args = p.parse_args(argv)
    if args.starts < 1:
        p.error("--starts: at least 1")
    names = args.only or list(SYSTEMS)
    times: dict[str, list[float | None]] = {name: [] for name in names}
    for i in range(args.starts):
        for name in names:
            got = sample(name)
            times[name] += got
            shown = ", ".join("never" if t is None else f"{t:.3f}" for t in got)
            bench_run.log(f"start {i + 1}/{args.starts} {name}: {shown} s")
    text = table(times)
    print(text)
    if args.out:
        doc = __doc__.split("\n\n", 2)[2].strip()
        made = (
            f"Made by `python -m bench.respawn --starts {args.starts}` at commit "
            f"{report.checkout_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"on {os.cpu_count()} CPUs."
        )
        title = f"# Respawn after SIGKILL, sampled\n\n{made}"
        atomic_write(args.out, f"{title}\n{doc}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
