"""Throughput ratios with the systems' loads interleaved, round after round.

    .venv/bin/python -m bench.interleaved [--systems node-cluster-rr clusterkit-shared ...]
        [--rounds 8] [--duration 8] [--out bench/INTERLEAVED.md]

bench/run.py measures one system after another, so a ratio of its medians compares loads
run minutes apart; on a machine whose speed drifts (a VM sharing its host's CPUs) that
drift lands in the ratio. Here every system is started once, as bench/run.py starts it, and
kept running (an idle system takes no CPU). Each round runs one wrk load against each system
in turn, keep-alive then new-connection, and takes each system's ratio to the first system
within that round. Reported: the median of the rounds' ratios, their lowest and highest,
and the CPU time per request (the system's, from bench/measure.py) medians. bench/run.py
does the same for the throughput targets' pairs (its --rounds), in RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from bench import procfs, report
from bench import run as bench_run
from bench.systems import BASELINE, SYSTEMS
from clusterkit.unitfiles import atomic_write

DEFAULT_SYSTEMS = (BASELINE, "clusterkit-shared", "clusterkit-reuseport")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--out", type=Path, help="also write the tables, with this script's doc, here")
    args = p.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.duration <= 30 or len(set(args.systems)) < 2:
        p.error("--rounds: at least 1; --duration: 1 to 30 s; --systems: at least 2 different")
    names = list(dict.fromkeys(args.systems))
    load_before = procfs.load_average()
    results = bench_run.measure_rounds(names, args.rounds, args.duration, 2)
    lines = report.interleaved_tables([{"names": names, "results": results}])
    print("\n".join(lines))
    if args.out:
        doc = __doc__.split("\n\n", 2)[2].strip()
        head = [
            "# Throughput ratios, loads interleaved",
            "",
            f"Made by `python -m bench.interleaved --systems {' '.join(names)} "
            f"--rounds {args.rounds} --duration {args.duration:g}`, "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
            f"load average before: {' '.join(load_before)}.",
            doc,
            "",
        ]
        atomic_write(args.out, "\n".join(head + lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
