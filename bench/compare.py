"""Does a second benchmark run reproduce the first? Ratios of two results.json, side by side.

    .venv/bin/python -m bench.compare bench/results.json second/results.json [--out FILE]

For every figure reported as a ratio to Node's cluster module, and every system, it prints
the ratio in run A and in run B and the relative difference, and says whether that
difference lies within the spread run A reports: the system's (max-min)/median over A's runs
plus the baseline's, since a ratio carries the noise of both. Then issue 9's targets as each
run checked them. Exit status 0 either way: this reports, it does not judge the machine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bench.report import FIGURES, Figure, median, round_ratios, targets
from bench.systems import BASELINE
from clusterkit.unitfiles import atomic_write


def spread(fig: Figure, rs: list[dict]) -> float | None:
    vals = [v for v in (fig.get(r) for r in rs) if v is not None]
    m = median(vals)
    return (max(vals) - min(vals)) / abs(m) if len(vals) > 1 and m else None


def ratio(fig: Figure, runs: dict[str, list[dict]], name: str) -> float | None:
    m, base = (
        median([fig.get(r) for r in runs.get(name, [])]),
        median([fig.get(r) for r in runs.get(BASELINE, [])]),
    )
    return m / base if m is not None and base else None


def _command(meta: dict) -> str:
    """The run's command, with no directory of this machine in it."""
    return re.sub(r"(?<![\w.])/\S*/", "", meta.get("command", "?"))


def _machine(meta: dict) -> str:
    return f"{meta.get('cpu', '?')}, {meta.get('cpus', '?')} CPUs, Linux {meta.get('kernel', '?')}"


def _when_and_what(meta: dict) -> str:
    """A run's date, command, the commit it measured and the machine it ran on."""
    commit = meta.get("commit", "? (not recorded by this run)")
    return (
        f"{meta.get('date', '?')}, `{_command(meta)}`, code: commit {commit}, "
        f"machine: {_machine(meta)}"
    )


def compare(a: dict, b: dict, a_label: str, b_label: str) -> list[str]:
    ra, rb = a["runs"], b["runs"]
    lines = [
        "# Benchmark reproducibility: two full runs compared",
        "",
        f"- run A: `{a_label}`, {_when_and_what(a['meta'])}",
        f"- run B: `{b_label}`, {_when_and_what(b['meta'])}",
        f'- ratios are to `{BASELINE}` within each run; "allowed" is run A\'s spread '
        "((max-min)/median of its runs) of the system plus that of the baseline.",
        "",
    ]
    if _machine(a["meta"]) != _machine(b["meta"]):
        lines.insert(
            5,
            "- **the runs were on different machines**: a ratio to Node's cluster module "
            "moves with the CPU (Node's JIT and Python's interpreter do not speed up alike), "
            "so a difference here is not only noise; compare runs of one machine for that.",
        )
    within = outside = 0
    for fig in FIGURES:
        if not fig.ratio:
            continue
        rows = []
        for name in ra:
            if name == BASELINE or name not in rb:
                continue
            x, y = ratio(fig, ra, name), ratio(fig, rb, name)
            if x is None or y is None:
                continue
            s_sys, s_base = spread(fig, ra[name]), spread(fig, ra[BASELINE])
            allowed = (s_sys or 0) + (s_base or 0) if s_sys is not None else None
            diff = abs(y - x) / x if x else None
            ok = None if allowed is None or diff is None else diff <= allowed
            within += ok is True
            outside += ok is False
            verdict = "–" if ok is None else ("yes" if ok else "**no**")
            shown = "–" if allowed is None else f"{allowed:.0%}"
            rows.append(f"| {name} | {x:.2f}× | {y:.2f}× | {diff:.0%} | {shown} | {verdict} |")
        if rows:
            lines += [f"## {fig.title}", ""]
            lines += [
                "| system | A | B | difference | allowed | within |",
                "|---|---:|---:|---:|---:|---|",
            ]
            lines += rows + [""]
    lines.insert(5, f"- {within} ratios within run A's spread, {outside} outside.")
    rounds, rounds_within, rounds_outside = interleaved(a, b)
    lines.insert(
        6,
        f"- interleaved rounds (the ratios the targets are judged on): {rounds_within} of run "
        f"B's within the lowest–highest of run A's rounds, {rounds_outside} outside.",
    )
    lines += rounds
    ta, tb = (
        [row for row in targets(d["runs"], d.get("interleaved")) if row.startswith("| ")][1:]
        for d in (a, b)
    )
    lines += ["## Targets (issue 9) in each run", ""]
    lines += ["| target | A | met | B | met |", "|---|---:|---|---:|---|"]
    by_target = {row.split(" | ")[0]: row for row in tb}
    for row in ta:
        key = row.split(" | ")[0]
        other = by_target.get(key, "| – | – | – |")
        a_cells = row.strip("|").split(" | ")[1:]
        b_cells = other.strip("|").split(" | ")[1:]
        lines.append(
            f"{key} | {' | '.join(c.strip() for c in a_cells)} | "
            f"{' | '.join(c.strip() for c in b_cells)} |"
        )
    return lines


def interleaved(a: dict, b: dict) -> tuple[list[str], int, int]:
    """The interleaved rounds' throughput ratios (loads seconds apart, the figures issue 9's
    targets are judged on): run B's median of rounds against the lowest and highest of
    run A's rounds, the spread RESULTS.md reports beside each ratio."""
    lines = [
        "## Interleaved rounds: throughput ratio to each group's first system",
        "",
        "| group | load | system | A: median of rounds | A: lowest–highest | B: median of rounds "
        "| within |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    within = outside = 0
    groups_b = b.get("interleaved") or []
    for group in a.get("interleaved") or []:
        if "error" in group:
            continue
        pinned = bool(group.get("pinned"))
        names = group["names"]
        label = f"{names[0]}{', pinned' if pinned else ''}"
        for load in group["results"]:
            for name in names[1:]:
                ra = round_ratios([group], load, name, names[0], pinned)
                rb = round_ratios(groups_b, load, name, names[0], pinned)
                if not ra or not rb:
                    continue
                ok = min(ra) <= median(rb) <= max(ra)
                within += ok
                outside += not ok
                lines.append(
                    f"| {label} | {load} | {name} | {median(ra):.2f}× | {min(ra):.2f}–"
                    f"{max(ra):.2f}× | {median(rb):.2f}× | {'yes' if ok else '**no**'} |"
                )
    return lines + [""], within, outside


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="results.json of the first run")
    p.add_argument("b", type=Path, help="results.json of the second run")
    p.add_argument("--out", type=Path, help="write the Markdown here (default: stdout)")
    args = p.parse_args(argv)
    try:
        a, b = json.loads(args.a.read_text()), json.loads(args.b.read_text())
    except (OSError, ValueError) as e:
        print(f"compare: cannot read results: {e}", file=sys.stderr)
        return 2
    text = "\n".join(compare(a, b, args.a.name, args.b.name)) + "\n"
    if args.out:
        atomic_write(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
