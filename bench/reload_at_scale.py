"""Rolling reload of many workers under load: `clusterkit reload NAME --batch 25%`.

    .venv/bin/python -m bench.reload_at_scale [--workers 128] [--batch 25%]

Boots systemd 252 in a container (as the clusterkit rows of bench/run.py do), starts N
`serve_asyncio` workers of the benchmark's hello world behind one shared socket, waits until
every one is active, then runs the availability load of bench/measure.py (4 keep-alive and 4
new-connection threads) around `clusterkit reload hello --batch B`. Prints how long the reload
took, each batch's line as the CLI printed it, the failed requests (by kind) and the slowest
request. Not part of bench/run.py: N workers on a 2-CPU machine measure the machine as much as
clusterkit, so this is a check that a large reload loses nothing, not a ratio.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import measure
from bench.systems.clusterkit import PY, UNIT_NAME, Clusterkit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=128)
    p.add_argument("--batch", default="25%")
    args = p.parse_args(argv)
    if args.workers < 2:
        p.error("--workers: at least 2")

    system = Clusterkit("shared")
    try:
        # not system.start(): it waits until each worker has answered a request, which a
        # client cannot make happen for 128 workers behind one socket; active is enough here
        system.install(args.workers)
        t0 = time.monotonic()
        system.box.systemctl("start", "--no-block", f"{UNIT_NAME}.target")
        names = [f"{UNIT_NAME}@{k}.service" for k in range(args.workers)]
        while True:
            r = system.box.systemctl("is-active", *names, check=False)
            active = r.stdout.split().count("active")
            print(f"\r{active}/{args.workers} workers active", end="", flush=True)
            if active == args.workers:
                break
            if time.monotonic() - t0 > 300:
                print(f"\nonly {active}/{args.workers} workers active after 300 s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"\n{args.workers} workers active after {time.monotonic() - t0:.1f} s")

        out: dict = {}

        def reload() -> None:
            r = system.box.run(
                PY, "-m", "clusterkit.cli", "reload", UNIT_NAME, "--batch", args.batch, timeout=900
            )
            out["rc"], out["lines"] = r.returncode, r.stdout.splitlines()
            if r.returncode != 0:
                out["stderr"] = r.stderr

        a = measure.availability(system, reload, max_seconds=900)
        print(
            f"clusterkit reload {UNIT_NAME} --batch {args.batch}: exit {out.get('rc')}, "
            f"{a['action_s']:.1f} s"
        )
        for line in out.get("lines", []):
            print(f"  {line}")
        if out.get("stderr"):
            print(out["stderr"], file=sys.stderr)
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(a["failures"].items())) or "none"
        print(
            f"load: {a['ok']:,} requests ok, {a['failed']} failed ({kinds}); "
            f"slowest {a['max_latency_ms']:,.0f} ms"
        )
        return 0 if out.get("rc") == 0 and a["failed"] == 0 else 1
    finally:
        system.stop()


if __name__ == "__main__":
    sys.exit(main())
