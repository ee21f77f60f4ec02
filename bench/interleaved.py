"""Throughput ratios with the systems' loads interleaved, round after round.

    .venv/bin/python -m bench.interleaved [--systems node-cluster-rr clusterkit-shared ...]
        [--rounds 8] [--duration 8] [--pinned] [--out bench/INTERLEAVED.md]

bench/run.py measures one system after another, so a ratio of its medians compares loads
run minutes apart; on a machine whose speed drifts (a VM sharing its host's CPUs) that
drift lands in the ratio. Here every system is started once, as bench/run.py starts it, and
kept running (an idle system takes no CPU). Each round runs one wrk load against each system
in turn, keep-alive then new-connection, and takes each system's ratio to the first system
within that round. Reported: the median of the rounds' ratios, their lowest and highest,
and the CPU time per request (the system's, from bench/measure.py) medians. bench/run.py
does the same for the throughput targets' pairs (its --rounds), in RESULTS.md.
With --pinned each system runs one worker, every thread of the servers on CPU 0 and wrk
(one thread) on the other CPUs: the servers measured without wrk taking a share of their CPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

from bench import measure, procfs, report
from bench import run as bench_run
from bench.systems import BASELINE, REFERENCES, SYSTEMS
from clusterkit.unitfiles import atomic_write

DEFAULT_SYSTEMS = (BASELINE, "clusterkit-shared", "clusterkit-reuseport")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--systems", nargs="+", default=list(DEFAULT_SYSTEMS), choices=[*SYSTEMS, *REFERENCES]
    )
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--pinned", action="store_true", help="1 worker each, on CPU 0; wrk apart")
    p.add_argument("--out", type=Path, help="also write the tables, with this script's doc, here")
    args = p.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.duration <= 30 or len(set(args.systems)) < 2:
        p.error("--rounds: at least 1; --duration: 1 to 30 s; --systems: at least 2 different")
    cpus = os.cpu_count() or 1
    if args.pinned and cpus < 2:
        p.error(f"--pinned needs 2 CPUs or more (one for the servers, one for wrk), not {cpus}")
    pinned = measure.Pinned.on(cpus) if args.pinned else None
    names = list(dict.fromkeys(args.systems))
    load_before = procfs.load_average()
    workers = 1 if pinned else 2
    results = bench_run.measure_rounds(names, args.rounds, args.duration, workers, pinned)
    group = bench_run.group_record(names, workers, pinned)
    group["results"] = results
    lines = report.interleaved_tables([group])
    print("\n".join(lines))
    if args.out:
        doc = __doc__.split("\n\n", 2)[2].strip()
        head = [
            "# Throughput ratios, loads interleaved",
            "",
            f"Made by `python -m bench.interleaved --systems {' '.join(names)} "
            f"--rounds {args.rounds} --duration {args.duration:g}"
            f"{' --pinned' if pinned else ''}`, "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
            f"load average before: {' '.join(load_before)}.",
            doc,
            "",
        ]
        atomic_write(args.out, "\n".join(head + lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
