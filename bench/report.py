"""bench/RESULTS.md and bench/results.png from the per-run results."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from bench import procfs
from bench.client import SLOW
from bench.systems import BASELINE

SLOW_MS = SLOW * 1000


def _get(*path: str) -> Callable[[dict], float | None]:
    def get(run: dict) -> float | None:
        v = run
        for k in path:
            if not isinstance(v, dict) or k not in v:
                return None
            v = v[k]
        return v if isinstance(v, int | float) else None

    return get


def _scaling(run: dict) -> float | None:
    n, one = _get("keepalive", "rps")(run), _get("keepalive_1worker", "rps")(run)
    return n / one if n and one else None


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    get: Callable[[dict], float | None]
    better: str  # "higher" / "lower"
    ratio: bool = True
    fmt: str = "{:,.0f}"
    only_measured: bool = False  # rows only for the systems it was measured on


FIGURES = [
    Figure("ka_rps", "Keep-alive throughput (wrk)", "req/s", _get("keepalive", "rps"), "higher"),
    Figure(
        "ka_p99",
        "Keep-alive p99 latency (wrk)",
        "ms",
        _get("keepalive", "p99_ms"),
        "lower",
        fmt="{:.2f}",
    ),
    Figure(
        "nc_rps",
        "New connection per request throughput (wrk, `Connection: close`)",
        "req/s",
        _get("newconn", "rps"),
        "higher",
    ),
    Figure(
        "nc_p99",
        "New connection per request p99 latency (wrk)",
        "ms",
        _get("newconn", "p99_ms"),
        "lower",
        fmt="{:.2f}",
    ),
    Figure(
        "ka_cpu",
        "Keep-alive: the system's CPU time per request",
        "µs",
        _get("keepalive", "server_cpu_us"),
        "lower",
        fmt="{:.1f}",
    ),
    Figure(
        "nc_cpu",
        "New connection per request: the system's CPU time per request",
        "µs",
        _get("newconn", "server_cpu_us"),
        "lower",
        fmt="{:.1f}",
    ),
    Figure(
        "ka_load_cpu",
        "Keep-alive: wrk's own CPU time per request (the load generator's share)",
        "µs",
        _get("keepalive", "load_cpu_us"),
        "lower",
        ratio=False,
        fmt="{:.1f}",
    ),
    Figure(
        "fair_nc",
        "Fairness, new connection per request: busiest worker's share",
        "share",
        _get("fair_newconn", "busiest_share"),
        "lower",
        fmt="{:.1%}",
    ),
    Figure(
        "fair_ka",
        "Fairness, 8 keep-alive connections: busiest worker's share",
        "share",
        _get("fair_keepalive", "busiest_share"),
        "lower",
        fmt="{:.1%}",
    ),
    Figure(
        "kill",
        "Availability (a): SIGKILL of one worker under load: failed requests",
        "failed",
        _get("avail_kill", "failed"),
        "lower",
        ratio=False,
    ),
    Figure(
        "reload",
        "Availability (b): rolling reload under load: failed requests",
        "failed",
        _get("avail_reload", "failed"),
        "lower",
        ratio=False,
    ),
    Figure(
        "restart",
        "Availability (c): restart of all workers under load: failed requests",
        "failed",
        _get("avail_restart", "failed"),
        "lower",
        ratio=False,
    ),
    Figure(
        "start",
        "Start: from the start command until every worker has served",
        "s",
        _get("start_s"),
        "lower",
        fmt="{:.3f}",
    ),
    Figure(
        "respawn",
        "Respawn: from SIGKILL of a worker until a new worker pid serves",
        "s",
        _get("respawn", "respawn_s"),
        "lower",
        fmt="{:.3f}",
    ),
    Figure(
        "memory",
        "Memory: total PSS of every process (primary/master/daemon included)",
        "MiB",
        _get("memory", "pss_mib"),
        "lower",
        fmt="{:.1f}",
    ),
    Figure(
        "crash_starts",
        "Crash loop: worker 0 fails at every start for 30 s, under load: its starts",
        "starts",
        _get("crash_loop", "starts"),
        "lower",
        ratio=False,
        only_measured=True,
    ),
    Figure(
        "crash_gap",
        "Crash loop: the gap between its last starts (the back-off's pace)",
        "s",
        _get("crash_loop", "last_gap_s"),
        "higher",
        ratio=False,
        fmt="{:.2f}",
        only_measured=True,
    ),
    Figure(
        "crash_failed",
        "Crash loop: failed requests meanwhile (the other workers serve)",
        "failed",
        _get("crash_loop", "failed"),
        "lower",
        ratio=False,
        only_measured=True,
    ),
    Figure(
        "one_rps",
        "Scaling: keep-alive throughput with 1 worker",
        "req/s",
        _get("keepalive_1worker", "rps"),
        "higher",
    ),
    Figure(
        "scaling",
        "Scaling: N workers / 1 worker (keep-alive)",
        "x",
        _scaling,
        "higher",
        fmt="{:.2f}",
    ),
]


def median(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def table(fig: Figure, runs: dict[str, list[dict]]) -> list[str]:
    base = median([fig.get(r) for r in runs.get(BASELINE, [])])
    head = f"| system | median ({fig.unit}) |"
    sep = "|---|---:|"
    if fig.ratio:
        head += f" ratio to {BASELINE} |"
        sep += "---:|"
    head += " spread (max-min)/median | runs |"
    sep += "---:|---|"
    lines = [head, sep]
    for name, rs in runs.items():
        vals = [fig.get(r) for r in rs]
        if fig.only_measured and all(v is None for v in vals):
            continue
        m = median(vals)
        cell = fig.fmt.format(m) if m is not None else _na(fig, rs)
        row = f"| {name} | {cell} |"
        if fig.ratio:
            row += f" {m / base:.2f}× |" if m is not None and base else " – |"
        got = [v for v in vals if v is not None]
        spread = (max(got) - min(got)) / abs(m) if len(got) > 1 and m else None
        row += f" {spread:.0%} |" if spread is not None else " – |"
        row += " " + ", ".join(fig.fmt.format(v) if v is not None else "–" for v in vals) + " |"
        lines.append(row)
    return lines


def _na(fig: Figure, rs: list[dict]) -> str:
    for r in rs:
        for k in ("avail_reload", "avail_restart"):
            if fig.key in ("reload", "restart") and isinstance(r.get(k), dict):
                if r[k].get("note"):
                    return f"n/a ({r[k]['note']})"
        if fig.key == "respawn" and isinstance(r.get("respawn"), dict):
            if r["respawn"].get("respawn_s", 0) is None:
                return "never (not respawned)"
        for v in r.values():
            if isinstance(v, dict) and "error" in v:
                pass
    return "–"


def failure_details(key: str, runs: dict[str, list[dict]]) -> list[str]:
    lines = []
    for name, rs in runs.items():
        parts = []
        for r in rs:
            a = r.get(key) or {}
            if a.get("failed") is None:
                continue
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(a.get("failures", {}).items()))
            slow = ", ".join(f"{k} {v}" for k, v in sorted(a.get("slow", {}).items()))
            worst = a.get("max_latency_ms")
            reused = (
                f"of the failures {a.get('reused_no_response', 0)} on a reused keep-alive "
                "connection with no byte of response; "
                if kinds
                else ""
            )
            parts.append(
                f"{a['ok']:,} ok, {kinds or 'no failures'}; "
                + reused
                + (f"slowest request {worst:,.0f} ms; " if worst is not None else "")
                + f"slower than {SLOW_MS:g} ms: {slow or 'none'}; "
                f"action {a['action_s']:.2f}s"
            )
        if parts:
            lines.append(f"- {name}: " + " | ".join(parts))
    return lines


def crash_loop_details(runs: dict[str, list[dict]]) -> list[str]:
    """Per run: when PID 1 started the failing worker, and the state it and its socket ended in."""
    lines = []
    for name, rs in runs.items():
        parts = []
        for r in rs:
            c = r.get("crash_loop") or {}
            if "starts_s" not in c:
                continue
            at = ", ".join(f"{t:.1f}" for t in c["starts_s"])
            parts.append(
                f"started at {at} s after the SIGTERM; at {c['seconds']:g} s the worker was "
                f"{c['worker_state']}, its socket {c['socket_state']}"
            )
        if parts:
            lines.append(f"- {name}: " + " | ".join(parts))
    return lines


def chart(path: str, runs: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [f for f in FIGURES if f.key in ("ka_rps", "nc_rps", "memory", "fair_nc", "one_rps")]
    names = list(runs)
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ratios = []
        for f in shown:
            base = median([f.get(r) for r in runs.get(BASELINE, [])])
            m = median([f.get(r) for r in runs[name]])
            ratios.append(m / base if m is not None and base else 0)
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(shown))]
        bars = ax.bar(xs, ratios, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(shown)))
    labels = {
        "ka_rps": "keep-alive req/s\n(higher is better)",
        "nc_rps": "new-connection req/s\n(higher is better)",
        "memory": "total PSS\n(lower is better)",
        "fair_nc": "busiest worker share\n(lower is fairer)",
        "one_rps": "1-worker keep-alive req/s\n(higher is better)",
    }
    ax.set_xticklabels([labels[f.key] for f in shown], fontsize=8)
    ax.set_ylabel(f"ratio to {BASELINE} (median of runs)")
    ax.set_title("clusterkit benchmark: ratios to Node's cluster module (round-robin)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run(*argv: str) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def checkout_commit() -> str:
    """The commit the run measured, with ", uncommitted changes" when the checkout differs
    from it in the code that ran: clusterkit/, templates/, bench's Python (not the results
    a previous run left there)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sha = _run("git", "-C", here, "rev-parse", "--short=12", "HEAD")
    code = ("clusterkit", "templates", "bench/*.py", "bench/systems")
    dirty = _run("git", "-C", here, "status", "--porcelain", "--", *code)
    return sha + (", uncommitted changes" if dirty not in ("", "?") else "")


def machine_meta() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "?"
    with open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    try:
        with open("/etc/debian_version") as f:
            distro = "Debian " + f.read().strip()
    except OSError:
        distro = "?"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "distro": distro,
        "python": sys.version.split()[0],
        "wrk_version": _run("wrk", "-v"),
        "load_avg_at_end": procfs.load_average(),
        "commit": checkout_commit(),
    }


#: How clusterkit is run: method only. Every figure in RESULTS.md comes from the run's own data.
CLUSTERKIT_NOTES = [
    "## clusterkit: how it is run",
    "",
    "- Each clusterkit start boots systemd in a systemd-nspawn container with a private network "
    "(boot time in the system's description, not in the start figure); wrk and the Python client "
    "join its network namespace, pids are host pids. Memory counts the workers and the "
    "container's PID 1 (systemd, the primary); journald, dbus-daemon and logind also run there "
    "and are listed apart under the memory table (on a server they run anyway).",
    "- The units are the defaults `clusterkit generate` writes: `RestartSec=0` and the "
    "crash-loop back-off (no wait after an isolated crash). A respawn is: PID 1 notices the "
    "exit, runs the back-off (a oneshot of its own: a shell and one `systemctl show`) and "
    "starts the worker in a fresh sandbox; the unit's start shell (the pid line) `exec`s the "
    "worker, which imports Python and clusterkit and accepts; gunicorn "
    "forks an already-imported worker instead, which no systemd unit can do. What setting up "
    "a sandbox costs, setting by setting, is measured apart by `python -m bench.sandbox_cost` "
    "(`SANDBOX.md`).",
    "- Rows that change only the process model: `uvicorn`, `gunicorn-uvicorn` and "
    "`clusterkit-asgi` serve the same ASGI app with uvicorn's httptools protocol and uvloop; "
    "`gunicorn`, `clusterkit-gunicorn` (stock gunicorn, one sync worker per unit) and "
    "`clusterkit-wsgi` (waitress) serve the same WSGI app. `clusterkit-shared`/`-reuseport` "
    "run clusterkit's own `serve_asyncio`, the seed comparison with Node. Per request the "
    "process model changes nothing (in each, the kernel hands a connection to a worker, which "
    "serves it alone), and `clusterkit-asgi` also runs clusterkit's request limits "
    "(`clusterkit.asgiprotocols`, `clusterkit.asgilimits`), which `uvicorn` lacks: its "
    "throughput ratio to `uvicorn` is "
    "expected about 1.0×, the rounds' lowest and highest show how far noise moves it, and the "
    "CPU time per request tells the two apart where the ratios do not. What the units change "
    "is start, respawn, reload and memory (the tables above).",
    "- `clusterkit-gunicorn`: the SIGKILL hits gunicorn's sync worker, and the gunicorn master "
    "in the same unit (its MainPID) forks a new one; systemd restarts nothing, so its respawn "
    "figure is gunicorn's, not the units'.",
    "- Respawn is measured from the client: SIGKILL, then requests on new connections until "
    "one is served by a new worker pid. `tests/test_respawn.py` measures it from PID 1's "
    "journal records instead (exit -> start job -> serving -> READY=1).",
]


def _ratio(runs: dict[str, list[dict]], fig_key: str, a: str, b: str) -> float | None:
    fig = next(f for f in FIGURES if f.key == fig_key)
    ma = median([fig.get(r) for r in runs.get(a, [])])
    mb = median([fig.get(r) for r in runs.get(b, [])])
    return ma / mb if ma is not None and mb else None


#: the loads of bench/run.py's interleaved rounds, (label, Connection: close), by the key of
#: the FIGURES row that measures the same load
INTERLEAVED_LOADS = {
    "ka_rps": ("keep-alive", False),
    "nc_rps": ("new connection per request", True),
}


def _holding(groups: list[dict], pinned: bool) -> list[dict]:
    """The groups measured pinned (one worker each, apart from wrk), or the others."""
    return [g for g in groups if bool(g.get("pinned")) == pinned]


def round_ratios(
    groups: list[dict], load: str, name: str, base: str, pinned: bool = False
) -> list[float]:
    """Per round of the interleaved group holding both: *name*'s req/s over *base*'s."""
    for group in _holding(groups, pinned):
        results = group.get("results", {}).get(load, {})
        if name in results and base in results:
            pairs = zip(results[name], results[base], strict=True)
            return [r["rps"] / b["rps"] for r, b in pairs if b["rps"]]
    return []


def round_cpu_ratio(
    groups: list[dict], load: str, name: str, base: str, pinned: bool = False
) -> float | None:
    """In the interleaved group holding both: *name*'s median CPU time per request over
    *base*'s (the servers' own, without the load generator's share)."""
    for group in _holding(groups, pinned):
        results = group.get("results", {}).get(load, {})
        if name in results and base in results:
            cpu = [
                [r["server_cpu_us"] for r in results[n] if r.get("server_cpu_us")]
                for n in (name, base)
            ]
            if all(cpu):
                return median(cpu[0]) / median(cpu[1])
    return None


def interleaved_tables(groups: list[dict]) -> list[str]:
    """Per group and load: each system's median req/s, its ratio to the group's first system
    (median, lowest and highest of the rounds) and its CPU time per request."""
    lines = []
    for group in groups:
        names = group["names"]
        base = names[0]
        if "error" in group:
            lines += [f"- {', '.join(names)}: not measured: {group['error']}", ""]
            continue
        pinned = group.get("pinned")
        for load, by_name in group["results"].items():
            alone = f", {pinned['workers']} worker each, pinned apart from wrk" if pinned else ""
            lines += [f"### {load}: {', '.join(names)}{alone}", ""]
            if pinned:
                lines += [f"Pinned: {pinned['description']}.", ""]
            lines += [
                f"| system | median req/s | ratio to {base}: median of rounds | lowest | highest "
                "| CPU µs per request |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for name in names:
                ratios = round_ratios([group], load, name, base, bool(pinned))
                rps = [r["rps"] for r in by_name[name]]
                cpu = [r["server_cpu_us"] for r in by_name[name] if r.get("server_cpu_us")]
                lines.append(
                    f"| {name} | {median(rps):,.0f} | {median(ratios):.2f}× | {min(ratios):.2f}× "
                    f"| {max(ratios):.2f}× | {median(cpu) or float('nan'):.1f} |"
                )
            lines.append("")
            if pinned:
                lines += [_load_busy(names, by_name), ""]
        for name, summary in group.get("references", {}).items():
            lines += [f"A reference, not a system under test: **{name}**: {summary}.", ""]
    return lines


def _load_busy(names: list[str], by_name: dict[str, list[dict]]) -> str:
    """How busy wrk kept its own CPU(s) under each system's load: near 1.0, wrk and not the
    server set the pace, and the server's throughput (and ratio) is understated."""
    busy = [
        f"{name} {median([r['rps'] * r['load_cpu_us'] / 1e6 for r in by_name[name]]):.2f}"
        for name in names
        if all(r.get("load_cpu_us") for r in by_name[name])
    ]
    return (
        "wrk's CPU time over each load's length (median of the rounds; 1.0 is a whole CPU, "
        "where wrk and not the server sets the pace and the server's throughput is "
        f"understated): {', '.join(busy)}."
    )


#: bench/systems REFERENCES' floor: serve_asyncio's units, a fixed response and nothing else
FLOOR = "clusterkit-floor"


def targets(runs: dict[str, list[dict]], groups: list[dict] | None = None) -> list[str]:
    """Issue 9's targets, each checked on this run: a throughput ratio on the loads
    interleaved round by round where they were measured (else on the medians of the runs)."""
    lines = ["## Targets (issue 9), checked on this run", ""]
    if groups:
        lines += [
            "A throughput ratio is judged on the interleaved rounds (loads seconds apart, see "
            "below): the median of the rounds' ratios, then their lowest and highest, then the "
            "ratio of the medians of the runs (loads minutes apart), and how much CPU time the "
            "servers themselves used per request in those rounds, as a ratio too: where wrk "
            "shares the CPUs with the servers, its own share pulls a throughput ratio towards "
            "1.0, and this figure leaves it out. Where the machine has too few CPUs to pin wrk "
            'apart from N workers, the rows "pinned apart from wrk" measure the servers '
            "alone instead: one worker per system, every thread of the servers on one CPU and "
            "wrk on the others (see CPU pinning above).",
            "",
        ]
    lines += ["| target | this run | met |", "|---|---:|---|"]

    def line(what: str, shown: str, ok: bool | None) -> None:
        verdict = "–" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {what} | {shown} | {verdict} |")

    def row(what: str, value: float | None, ok: bool | None, fmt: str = "{:.2f}×") -> None:
        line(what, fmt.format(value) if value is not None else "not measured", ok)

    def throughput(
        what: str, key: str, name: str, base: str, goal: float | None, pinned: bool = False
    ) -> None:
        """A throughput ratio's row; *goal* None: for reference, no verdict (a reference
        has no runs of its own, so only the rounds show it)."""
        load = INTERLEAVED_LOADS[key][0]
        ratios = round_ratios(groups or [], load, name, base, pinned)
        if (pinned or goal is None) and not ratios:
            return  # not measured pinned (this machine pins wrk apart), or no reference run
        of_medians = None if pinned else _ratio(runs, key, name, base)
        medians = "not measured" if of_medians is None else f"{of_medians:.2f}×"
        if ratios:
            r = median(ratios)
            parts = [f"rounds {min(ratios):.2f}–{max(ratios):.2f}×"]
            if not pinned and goal is not None:  # the runs measure N workers, unpinned
                parts.append(f"medians of runs {medians}")
            cpu = round_cpu_ratio(groups or [], load, name, base, pinned)
            if cpu is not None:  # what the servers themselves use, wrk's share left out
                parts.append(f"server CPU per request {cpu:.2f}× {base}'s")
            shown = f"{r:.2f}× ({'; '.join(parts)})"
        else:
            r = of_medians
            shown = f"{medians} (medians of runs)" if r is not None else medians
        line(what, shown, None if r is None or goal is None else r >= goal)

    for mode in ("shared", "reuseport"):
        name = f"clusterkit-{mode}"
        if name not in runs:
            continue
        throughput(
            f"{name} (serve_asyncio) keep-alive ≥ 2.0× Node cluster", "ka_rps", name, BASELINE, 2.0
        )
        throughput(f"{name} new connection ≥ 2.5× Node cluster", "nc_rps", name, BASELINE, 2.5)
        alone = "1 worker each, pinned apart from wrk"
        throughput(
            f"{name} keep-alive ≥ 2.0× Node cluster, {alone}", "ka_rps", name, BASELINE, 2.0, True
        )
        throughput(
            f"{name} new connection ≥ 2.5× Node cluster, {alone}",
            "nc_rps",
            name,
            BASELINE,
            2.5,
            True,
        )
        r = _ratio(runs, "memory", name, BASELINE)
        row(f"{name} memory ≤ 0.4× Node cluster", r, r is not None and r <= 0.4)
    # what the keep-alive target asks of a Python server here: the floor (a fixed response,
    # nothing else) against Node, and how much of it serve_asyncio keeps
    for pinned, alone in ((False, ""), (True, ", 1 worker each, pinned apart from wrk")):
        throughput(
            f"for reference: {FLOOR} (the most a Python server serves here) keep-alive vs "
            f"Node cluster{alone}",
            "ka_rps",
            FLOOR,
            BASELINE,
            None,
            pinned,
        )
        throughput(
            f"for reference: clusterkit-shared keep-alive vs {FLOOR}{alone}",
            "ka_rps",
            "clusterkit-shared",
            FLOOR,
            None,
            pinned,
        )
    for kind in ("ka_rps", "nc_rps"):
        label = "keep-alive" if kind == "ka_rps" else "new connection"
        what = f"clusterkit-asgi ≥ 1.0× uvicorn --workers ({label})"
        throughput(what, kind, "clusterkit-asgi", "uvicorn", 1.0)
    for name, rs in runs.items():
        if not name.startswith("clusterkit"):
            continue
        for key, what in (("avail_reload", "rolling reload"), ("avail_restart", "restart-all")):
            failed = [(r.get(key) or {}).get("failed") for r in rs]
            worst = max((f for f in failed if f is not None), default=None)
            row(f"{name}: 0 failed requests on {what} (worst run)", worst, worst == 0, "{:g}")
    for name in runs:
        loops = [r["crash_loop"] for r in runs[name] if "starts_s" in r.get("crash_loop", {})]
        if not loops:
            continue
        reuseport = name.endswith("-reuseport")
        if not reuseport:
            gap = median([c["last_gap_s"] for c in loops])
            row(
                f"{name}: crash loop paced: gap between its last starts ≥ 3 s",
                gap,
                gap is not None and gap >= 3,
                "{:.2f} s",
            )
        # reuseport: the start limit (5 in 30 s) takes the instance and its socket out of the
        # group; shared: no start limit, the socket every worker uses stays open
        state, what = (
            ("failed", "the instance's socket leaves the group within 30 s")
            if reuseport
            else ("active", "the socket stays active")
        )
        n = sum(c["socket_state"] == state for c in loops)
        row(f"{name}: crash loop: {what} (runs)", n, n == len(loops), f"{{:g}}/{len(loops)}")
        if not reuseport:
            worst = max(c["failed"] for c in loops)
            row(f"{name}: crash loop: 0 failed requests (worst run)", worst, worst == 0, "{:g}")
    fig = next(f for f in FIGURES if f.key == "respawn")
    for name in runs:
        m = median([fig.get(r) for r in runs[name]])
        # clusterkit-gunicorn: gunicorn's own master re-forks the killed worker, not systemd
        if name.startswith("clusterkit") and name != "clusterkit-gunicorn" and m is not None:
            row(f"{name}: respawn after SIGKILL ≤ 0.3 s", m, m <= 0.3, "{:.3f} s")
    return lines


def server_decision(runs: dict[str, list[dict]]) -> list[str]:
    """Issue 9, item 1: serve_asyncio is clusterkit's own server, not uvicorn's protocol. The
    figures are this run's: the same units, socket and parser under both, only the server
    differs (``clusterkit-shared`` runs serve_asyncio, ``clusterkit-asgi`` serve_asgi)."""
    own, adopted = "clusterkit-shared", "clusterkit-asgi"
    if own not in runs or adopted not in runs:
        return []
    figures = []
    for label, rps, cpu in (
        ("keep-alive", "ka_rps", "ka_cpu"),
        ("new connection", "nc_rps", "nc_cpu"),
    ):
        served, used = _ratio(runs, rps, own, adopted), _ratio(runs, cpu, own, adopted)
        if served is None or used is None:
            return []
        figures.append(
            f"{label} {served:.2f}× its throughput at {1 / used:.1f}× less CPU per request"
        )
    return [
        "## serve_asyncio: clusterkit's own server, not a maintained one (issue 9, item 1)",
        "",
        "`serve_asyncio` keeps clusterkit's own HTTP/1.1 server (`clusterkit/httpserver.py` on "
        "httptools, llhttp: Node's parser; no pure-Python parser) rather than serving the "
        "handler through uvicorn's protocol, which `serve_asgi` runs. The protocol suite "
        "(`tests/test_protocol.py`, in `bash dev test`) runs its cases against both and "
        "asserts the same outcome; uvicorn's protocols pass it only with what "
        "`clusterkit.asgiprotocols` adds to them. What uvicorn's protocol would cost, in this "
        f"run (medians of the runs; `{own}` against `{adopted}`: the same units, socket "
        f"and parser, uvicorn's httptools protocol and uvloop in `{adopted}`): "
        f"{'; '.join(figures)}. How the decision was first made, with uvicorn's h11 protocol "
        "too: [SERVER.md](SERVER.md) (`python -m bench.server_compare`).",
        "",
    ]


def write(
    out: str, meta: dict, runs: dict[str, list[dict]], groups: list[dict] | None = None
) -> None:
    chart(os.path.join(out, "results.png"), runs)
    versions: dict[str, str] = {}
    for rs in runs.values():
        for r in rs:
            versions.update(r.get("versions", {}))
    md = [
        "# clusterkit benchmark results",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['cpu']}, {meta['cpus']} CPUs, {meta['memory']}, {meta['distro']}, "
        f"Linux {meta['kernel']}; load average (1, 5, 15 min) before the run "
        f"{' '.join(meta.get('load_avg_at_start', ['?']))}, at the end "
        f"{' '.join(meta['load_avg_at_end'])}",
        f"- CPU pinning: {meta.get('pinning', 'none')}",
        f"- code: commit {meta.get('commit', '? (not recorded by this run)')}",
        f"- versions: Python {meta['python']}, "
        + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        + f", {meta['wrk_version']}",
        f"- command: `{meta['command']}` ({meta['runs']} run(s) per system, {meta['workers']} "
        f"workers, {meta['duration']:g} s wrk loads, {meta['fair_seconds']:g} s fairness loads)",
        f"- load: `{meta['wrk']}`, loopback; every figure is the median of the runs, "
        f"ratios are to `{BASELINE}` (Node's cluster module, the seed's hello world).",
        "- see [README.md](README.md) for what each figure means and how it is measured.",
        "",
        "![ratios to Node cluster](results.png)",
        "",
        *targets(runs, groups),
        "",
        *server_decision(runs),
    ]
    if groups:
        md += [
            "## Throughput, loads interleaved round by round",
            "",
            "The tables further down compare medians of loads run minutes apart (each system "
            "runs its whole measure in turn), and a VM sharing its host's CPUs drifts in that "
            "time. Here the systems of a group run side by side, an idle one taking no CPU, and "
            f"each of {meta.get('rounds', '?')} rounds runs one {meta['duration']:g} s load "
            "against each of them in turn: a ratio within a round compares loads seconds apart.",
            "",
            *interleaved_tables(groups),
        ]
    md += [
        "## Systems and exact commands",
        "",
    ]
    for name, rs in runs.items():
        r = next((r for r in rs if r.get("commands")), rs[0] if rs else {})
        md.append(f"- **{name}**: {r.get('description', '')}")
        for op, cmd in r.get("commands", {}).items():
            md.append(f"  - {op}: `{cmd}`")
    for fig in FIGURES:
        md += ["", f"## {fig.title}", "", *table(fig, runs)]
        detail = {
            "kill": "avail_kill",
            "reload": "avail_reload",
            "restart": "avail_restart",
            "crash_failed": "crash_loop",
        }
        if fig.key in detail:
            md += ["", *failure_details(detail[fig.key], runs)]
        if fig.key == "crash_starts":
            md += ["", *crash_loop_details(runs)]
        if fig.key == "memory":
            apart = [(n, r) for n, rs in runs.items() for r in rs[:1] if "memory" in r]
            apart = [(n, r["memory"]) for n, r in apart if r["memory"].get("not_counted_mib")]
            if apart:
                md.append("")
            for name, m in apart:
                text = ", ".join(f"{k} {v:.1f} MiB" for k, v in m["not_counted_mib"].items())
                md.append(
                    f"- {name}: {m['processes']} processes counted; also running, not counted "
                    f"(run 1): {text}"
                )
        if fig.key in ("fair_nc", "fair_ka"):
            k = "fair_newconn" if fig.key == "fair_nc" else "fair_keepalive"
            md.append("")
            for name, rs in runs.items():
                counts = [str(r.get(k, {}).get("counts", "–")) for r in rs]
                md.append(f"- {name}: requests per worker {'; '.join(counts)}")
    md += [
        "",
        "## Notes",
        "",
        "- Where wrk is not pinned apart (see CPU pinning above) it runs on the same CPUs as the "
        "servers and takes a share of them, so absolute throughput and the N/1-worker scaling "
        "are bounded by the load generator too. The CPU time per request does not depend on how "
        "the CPUs were shared: user + system time of every process counted in memory (for "
        "the systems) or of wrk (the load generator), over the load, divided by the requests "
        "served. The kernel charges loopback TCP work to whichever side is in a system call, "
        "so part of each side's cost shows in the other's; wrk's own figure also differs by "
        "system, with the size of the responses it parses.",
        "- gunicorn's default sync worker closes the connection after every response: its "
        "keep-alive figures are new-connection figures.",
        "- The seed's `cluster.js` only logs a worker's death: no respawn, no reload; its "
        "restart-all is a restart of the program (the port is closed meanwhile).",
        "- Other processes may have shared the machine: see the load average above; compare "
        "ratios within one run rather than absolute figures across runs.",
    ]
    if any(name.startswith("clusterkit") for name in runs):
        md += ["", *CLUSTERKIT_NOTES]
    errors = [
        f"- {name} run {i + 1}: {k}: {v['error']}"
        for name, rs in runs.items()
        for i, r in enumerate(rs)
        for k, v in r.items()
        if isinstance(v, dict) and "error" in v
    ]
    if errors:
        md += ["", "## Measurement errors", "", *errors]
    text = "\n".join(md) + "\n"
    # no absolute path of this machine: the checkout is `.`
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = text.replace(root + "/", "").replace(root, ".")
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write(text)
