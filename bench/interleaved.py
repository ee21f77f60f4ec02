"""Throughput ratios with the systems' loads interleaved, round after round.

    .venv/bin/python -m bench.interleaved [--systems node-cluster-rr clusterkit-shared ...]
        [--rounds 8] [--duration 8] [--out bench/INTERLEAVED.md]

bench/run.py measures one system after another, so a ratio of its medians compares loads
run minutes apart; on a machine whose speed drifts (a VM sharing its host's CPUs) that
drift lands in the ratio. Here every system is started once, as bench/run.py starts it, and
kept running (an idle system takes no CPU). Each round runs one wrk load against each system
in turn, keep-alive then new-connection, and takes each system's ratio to the first system
within that round. Reported: the median of the rounds' ratios, their lowest and highest,
and the CPU time per request (the system's, from bench/measure.py) medians.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

from bench import measure, procfs
from bench import run as bench_run
from bench.systems import BASELINE, SYSTEMS
from clusterkit.unitfiles import atomic_write

DEFAULT_SYSTEMS = (BASELINE, "clusterkit-shared", "clusterkit-reuseport")
LOADS = (("keep-alive", False), ("new connection per request", True))


def measure_rounds(names: list[str], rounds: int, seconds: float) -> dict:
    """{load: {system: [per-round wrk results]}}."""
    out: dict = {load: {name: [] for name in names} for load, _ in LOADS}
    with bench_run.all_started(names, 2) as systems:
        for i in range(rounds):
            for load, close in LOADS:
                for system in systems:
                    r = measure.wrk(system, seconds, close)
                    out[load][system.name].append(r)
                    print(
                        f"round {i + 1}/{rounds} {load} {system.name}: {r['rps']:,.0f} req/s",
                        file=sys.stderr,
                        flush=True,
                    )
    return out


def table(results: dict, names: list[str]) -> list[str]:
    base = names[0]
    lines = []
    for load, _ in LOADS:
        lines += [
            f"### {load}",
            "",
            f"| system | median req/s | ratio to {base}: median of rounds | lowest | highest "
            "| CPU µs per request |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in names:
            rs = results[load][name]
            ratios = [r["rps"] / b["rps"] for r, b in zip(rs, results[load][base], strict=True)]
            cpu = [r["server_cpu_us"] for r in rs if r.get("server_cpu_us") is not None]
            lines.append(
                f"| {name} | {statistics.median(r['rps'] for r in rs):,.0f} "
                f"| {statistics.median(ratios):.2f}× | {min(ratios):.2f}× | {max(ratios):.2f}× "
                f"| {statistics.median(cpu) if cpu else float('nan'):.1f} |"
            )
        lines.append("")
    return lines


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
    results = measure_rounds(names, args.rounds, args.duration)
    lines = table(results, names)
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
