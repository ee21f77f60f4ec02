"""What the sandbox costs each command systemd starts in it, setting by setting.

    .venv/bin/python -m bench.sandbox_cost [--rounds 6] [--starts 6] [--out bench/SANDBOX.md]

Every command of a worker's unit (ExecStart=, whose shell prints the pid before it execs the
worker) gets its own mount namespace, seccomp filters and dynamic user before it runs;
ExecStart= lies on the respawn path (the crash-loop back-off is a unit of its own, with no
sandbox). This boots systemd 252 in a container (as the clusterkit rows of bench/run.py do)
and times `systemctl start` of `Type=oneshot` units that run `/bin/true` under: no sandbox,
`DynamicUser=yes` alone, the sandbox clusterkit generates (`templates/hardening.j2`, rendered
for a default spec), and that sandbox plus `ProtectKernelTunables=yes`, which it replaces by
`ReadOnlyPaths=/sys` and `ProcSubset=pid`. The variants take turns, so drift of the machine
hits all alike; medians in milliseconds include systemctl's own round trip, the same for
every variant.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from clusterkit import render
from clusterkit.container import Container
from clusterkit.spec import build_spec
from clusterkit.unitfiles import atomic_write

ONESHOT = "[Service]\nType=oneshot\nExecStart=/bin/true\n"


def variants() -> dict[str, str]:
    """Label -> [Service] lines added to the oneshot unit."""
    sandbox = "DynamicUser=yes\n" + render.hardening(
        build_spec({}, {"name": "c", "exec": "/bin/true"})
    )
    return {
        "no sandbox": "",
        "`DynamicUser=yes` only": "DynamicUser=yes\n",
        "clusterkit's sandbox (`DynamicUser=yes` + hardening.j2)": f"{sandbox}\n",
        "the same + `ProtectKernelTunables=yes`": f"{sandbox}\nProtectKernelTunables=yes\n",
    }


def measure(rounds: int, starts: int) -> dict[str, list[float]]:
    cases = variants()
    times: dict[str, list[float]] = {label: [] for label in cases}
    with Container() as box:
        for i, lines in enumerate(cases.values()):
            box.write_file(f"/run/systemd/system/cost{i}.service", ONESHOT + lines)
        box.systemctl("daemon-reload")
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
            for i, label in enumerate(cases):
                for _ in range(starts):
                    t0 = time.perf_counter()
                    box.systemctl("start", f"cost{i}.service")
                    times[label].append(time.perf_counter() - t0)
    return times


def table(times: dict[str, list[float]]) -> str:
    base = statistics.median(next(iter(times.values())))
    rows = [
        "| unit | median start (ms) | over no sandbox (ms) | starts |",
        "|---|---:|---:|---:|",
    ]
    for label, ts in times.items():
        median = statistics.median(ts)
        rows.append(
            f"| {label} | {median * 1000:.1f} | {(median - base) * 1000:+.1f} | {len(ts)} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--starts", type=int, default=6)
    p.add_argument("--out", type=Path, help="also write the table, with this script's doc, here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.starts < 1:
        p.error("--rounds and --starts: at least 1")
    text = table(measure(args.rounds, args.starts))
    print(text)
    if args.out:
        doc = __doc__.split("\n\n", 2)[2].strip()
        title = "# Sandbox cost per command\n\nMade by `python -m bench.sandbox_cost`."
        atomic_write(args.out, f"{title}\n{doc}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
