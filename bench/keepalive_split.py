"""Keep-alive throughput and connection split, shared vs reuseport, loads interleaved.

    .venv/bin/python -m bench.keepalive_split [--rounds 4] [--duration 8]

Starts `clusterkit-shared` and `clusterkit-reuseport` as bench/run.py does (systemd 252 in a
container, 2 `serve_asyncio` workers), then alternates the two modes' wrk keep-alive loads
(64 connections opened at once) so that slow drift of the machine hits both alike. Midway
through each load it counts how many of the 64 connections each worker holds (its socket file
descriptors, less those it had before the load). Prints each load and the median per mode.
A check of one claim (does the burst of accepts in shared mode cost keep-alive throughput?),
not part of bench/run.py.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from bench import measure, procfs
from bench import run as bench_run

MODES = ("clusterkit-shared", "clusterkit-reuseport")


def one_load(system, seconds: float) -> tuple[float, list[int]]:
    """(requests/s, connections held per worker midway through the load)."""
    before = {pid: len(procfs.socket_inodes(pid)) for pid in system.worker_pids()}
    load = subprocess.Popen(
        measure.wrk_argv(system, seconds, close=False), stdout=subprocess.PIPE, text=True
    )
    time.sleep(seconds / 2)
    split = sorted((len(procfs.socket_inodes(pid)) - n for pid, n in before.items()), reverse=True)
    out, _ = load.communicate(timeout=seconds + 15)
    if load.returncode != 0:
        raise RuntimeError(f"wrk failed with status {load.returncode}")
    return measure.parse_wrk(out)["rps"], split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=8.0)
    args = p.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.duration <= 30:
        p.error("--rounds: at least 1; --duration: 1 to 30 s")
    with bench_run.all_started(list(MODES), 2) as systems:
        rps: dict[str, list[float]] = {name: [] for name in MODES}
        for i in range(args.rounds):
            for system in systems:
                r, split = one_load(system, args.duration)
                rps[system.name].append(r)
                print(f"round {i + 1} {system.name}: {r:,.0f} req/s, connections {split}")
        for name in MODES:
            print(f"{name}: median {statistics.median(rps[name]):,.0f} req/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
