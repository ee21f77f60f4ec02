"""The ``clusterkit`` command.

Bad input gets one line on stderr naming the problem and exit status 2,
before anything is written. Failures of the system (systemd not running, a
unit that failed) exit 1 with a line that says what to do next.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from clusterkit import __version__, terminal, trust

if TYPE_CHECKING:
    from datetime import datetime

USAGE_ERROR = 2
FAILURE = 1


class CommandError(Exception):
    """A failure to report on one line: (message, exit status)."""

    def __init__(self, message: str, status: int = FAILURE) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage on error; one line says it better.
    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _number(minimum: int, maximum: int, what: str) -> Callable[[str], int]:
    """An argparse type: ASCII digits within minimum..maximum (``int`` would also take
    ``٣``, `` 3`` and ``3_000``, and any length)."""

    def parse(text: str) -> int:
        if text.isascii() and text.isdigit() and len(text) <= 9:
            if minimum <= int(text) <= maximum:
                return int(text)
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise argparse.ArgumentTypeError(f"{shown!r} is not {what}")

    return parse


_WORKER_ID = _number(0, 999_999_999, "a worker id (0, 1, 2, ...)")


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    """The settings of a cluster (spec.OPTIONS); each also a key of [tool.clusterkit]."""
    from clusterkit.spec import OPTIONS

    p.add_argument(
        "--config",
        type=Path,
        help="pyproject.toml with a [tool.clusterkit] table "
        "(default: ./pyproject.toml when it has one)",
    )
    for option in OPTIONS:
        kind: dict[str, object] = {"metavar": option.metavar or option.key.upper()}
        if option.switch:
            kind = {"action": "store_const", "const": True, "default": None}
        elif option.repeatable:
            kind["action"] = "append"
        default = option.default_text()
        text = option.help + (f" ({default})" if default == "required" else "")
        text += f" (default: {default})" if default and default != "required" else ""
        p.add_argument(
            f"--{option.key}", dest=_dest(option.key), help=text.replace("%", "%%"), **kind
        )
        for old in option.old_keys:
            p.add_argument(f"--{old}", dest=_dest(old), help=argparse.SUPPRESS, **kind)


def _dest(key: str) -> str:
    return "option_" + key.replace("-", "_")


def _flags(args: argparse.Namespace) -> dict[str, object]:
    """The spec options given as flags (None: not given); deprecated spellings warned about."""
    from clusterkit.spec import OPTIONS, deprecations

    flags: dict[str, object] = {}
    for option in OPTIONS:
        flags[option.key] = getattr(args, _dest(option.key))
        for old in option.old_keys:
            value = getattr(args, _dest(old))
            if value is not None:
                for warning in deprecations([old]):
                    print(f"warning: --{warning.replace(' now ', ' now --')}", file=sys.stderr)
                if flags[option.key] is None:
                    flags[option.key] = value
    return flags


def spec_from_args(args: argparse.Namespace):
    """The validated Spec for these arguments (and their config file)."""
    from clusterkit import shadow
    from clusterkit.spec import SpecError, build_spec, deprecations, load_config

    try:
        path = config_path(args)
        config = load_config(path) if path is not None else {}
        for warning in deprecations(config):
            print(f"warning: [tool.clusterkit] key {warning}", file=sys.stderr)
        spec = build_spec(config, _flags(args))
    except SpecError as e:
        raise CommandError(str(e), USAGE_ERROR) from None
    problem = shadow.refusal(spec.name, user=spec.manager == "user")
    if problem is not None:
        raise CommandError(problem, USAGE_ERROR)
    return spec


def config_path(args: argparse.Namespace) -> Path | None:
    """--config, or ./pyproject.toml; as root, only root's unless named explicitly (echoed)."""
    from clusterkit import trust

    if args.config is None:
        implicit = Path("pyproject.toml")
        if not implicit.is_file():
            return None
        reason = trust.why_untrusted(implicit) if trust.as_root() else None
        if reason is not None:
            raise CommandError(
                f"./pyproject.toml: not read, {reason}: root takes configuration only from "
                "root's files; review it, then name it with --config pyproject.toml",
                USAGE_ERROR,
            )
        return implicit
    if trust.as_root() and trust.why_untrusted(args.config) is not None:
        # Named on purpose by root: read it, but say whose file this is.
        try:
            owner = trust.owner_name(args.config.stat().st_uid)
        except OSError:
            owner = "?"
        print(f"using config {args.config} (owned by {owner})", file=sys.stderr)
    return args.config


def _warn_env_file(spec) -> None:
    from clusterkit import trust

    if spec.env_file is not None:
        problem = trust.secret_file_problem(Path(spec.env_file))
        if problem is not None:
            print(
                f"warning: --env-file: {problem}; install will refuse it until it is "
                "root-owned with mode 0600",
                file=sys.stderr,
            )


def _warn_missing_program(spec) -> None:
    # The units may be for another host, so only a warning here; install refuses.
    if not os.access(spec.exec[0], os.X_OK):
        print(
            f"warning: --exec: {spec.exec[0]} is not an executable file on this machine; "
            "install will refuse it where it is missing",
            file=sys.stderr,
        )


def cmd_generate(args: argparse.Namespace) -> int:
    from clusterkit import render, unitfiles

    spec = spec_from_args(args)
    try:
        result = render.write(spec, args.output, force=args.force)
    except unitfiles.HandEditedError as e:
        raise CommandError(str(e)) from None
    except unitfiles.UnsafePathError as e:
        raise CommandError(f"--output: {e}", USAGE_ERROR) from None
    except OSError as e:
        raise CommandError(f"--output: cannot write {args.output}: {e.strerror}") from None
    _warn_env_file(spec)
    _warn_missing_program(spec)
    for name in result.written:
        print(f"wrote {args.output / name}")
    for name in result.unchanged:
        print(f"unchanged {args.output / name}")
    for name in result.removed:
        print(f"removed {args.output / name} (no longer part of this cluster)")
    return 0


def _manager(args: argparse.Namespace):
    from clusterkit.manager import Manager

    if args.runtime and args.user_manager:
        raise CommandError("--runtime and --user cannot be combined", USAGE_ERROR)
    return Manager("user" if args.user_manager else "system", runtime=args.runtime)


@contextlib.contextmanager
def _install_errors() -> Iterator[None]:
    """install/uninstall failures as one-line CommandErrors: bad input 2, the system 1."""
    from clusterkit import install, unitfiles

    try:
        yield
    except (install.InstallRefused, unitfiles.UnsafePathError) as e:
        raise CommandError(str(e), USAGE_ERROR) from None
    except (install.InstallError, unitfiles.HandEditedError) as e:
        raise CommandError(str(e)) from None
    except OSError as e:
        raise CommandError(f"cannot write {e.filename or 'the units'}: {e.strerror}") from None


def cmd_install(args: argparse.Namespace) -> int:
    import json

    from clusterkit import install

    manager = _manager(args)
    if not args.source.is_dir():
        raise CommandError(f"--from: {args.source} is not a directory", USAGE_ERROR)
    names = [args.name] if args.name else install.clusters_in(args.source)
    if not names:
        raise CommandError(f"--from: no clusterkit units in {args.source}; run clusterkit generate")
    for name in names:
        with _install_errors():
            done = install.install(args.source, name, manager, force=args.force, now=args.now)
        changed = bool(done.written or done.removed)
        if args.json:  # for automation (Ansible's "changed")
            report = {"name": name, "changed": changed, **done.__dict__, "started": args.now}
            print(json.dumps(report, default=list))
            continue
        files = [*done.written, *done.unchanged]
        state = "installed" if changed else "unchanged"
        print(f"{state} {name}: {', '.join(files)} in {manager.unit_dir}")
        if done.removed:
            print(f"removed {', '.join(done.removed)} (no longer part of {name})")
        if args.now:
            print(f"started {name}.target")
        else:
            user = " --user" if manager.user else ""
            print(f"start it with: systemctl{user} start {name}.target")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from clusterkit import install

    manager = _manager(args)
    with _install_errors():
        removed = install.uninstall(args.name, manager)
    print(f"uninstalled {args.name}: removed {', '.join(removed)}")
    print(f"drop-ins under {manager.unit_dir}/{args.name}@.service.d/ (if any) were kept")
    return 0


# ---- the primary: status, events and control of a running cluster ----


UNKNOWN_CLUSTER = 4


def _settings(args: argparse.Namespace):
    """The cluster NAME: installed on this host, or run by `clusterkit up`; else exit 4."""
    from clusterkit import manager, primary

    try:
        primary.check_name(args.name)
    except ValueError as e:
        raise CommandError(str(e), USAGE_ERROR) from None
    found = manager.find(args.name, user=args.user_manager)
    if found is None:
        where = "your user's service manager" if args.user_manager else "this host"
        raise CommandError(
            f"no cluster {args.name!r} on {where}: install it (clusterkit install) or run it "
            "(clusterkit up); clusterkit ls lists the clusters here",
            UNKNOWN_CLUSTER,
        )
    return primary.setup_primary(args.name, manager=found)


def _primary_call(call, *args, **kwargs):
    """Run a clusterkit.primary call; bad input exits 2, systemd's refusals 1, on one line."""
    from clusterkit import primary
    from clusterkit.spec import SpecError

    try:
        return call(*args, **kwargs)
    except SpecError as e:
        raise CommandError(str(e), USAGE_ERROR) from None
    except primary.PrimaryError as e:
        raise CommandError(str(e)) from None


def _last_exits(settings, workers: Collection[int]) -> dict[int, object]:
    from clusterkit import events

    reader = events.EventReader(settings.name, manager=settings.manager, exits_only=True)
    try:
        return reader.last_exits(workers)
    finally:
        reader.close()


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return (
        f"{s // 86400}d{s % 86400 // 3600}h"
        if s >= 86400
        else (f"{s // 3600}h{s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m{s % 60}s")
    )


#: status: some worker does not serve (as systemctl status says 3 for "not running")
NOT_HEALTHY = 3


def _why(settings, worker_id: int) -> list[str]:
    """Why a worker does not serve: systemd's state and result, its last log lines."""
    from clusterkit import journals, logs, names

    unit = names.service(settings.name, worker_id)
    props = settings.manager.show([unit], ("ActiveState", "SubState", "Result"))[0]
    why = [f"{props['ActiveState']}/{props['SubState']}, result {props['Result']}"]
    scheduling = settings.spec.scheduling if settings.spec else names.SHARED
    socket_unit = names.socket(settings.name, scheduling, worker_id)
    sock = settings.manager.show([socket_unit], ("ActiveState", "Result"))[0]
    socket_down = sock["ActiveState"] != "active"
    if socket_down:  # e.g. the address is taken: PID 1 says so in the socket's records
        why.append(f"{socket_unit} is {sock['ActiveState']} (result {sock['Result']})")
    try:
        if socket_down:
            why += [f"| {line}" for line in journals.manager_lines(settings.manager, socket_unit)]
        why += [f"| {line}" for line in logs.last_lines(settings.name, worker_id, settings.manager)]
    except OSError:
        pass  # no journal to read here (not root, nor in systemd-journal)
    return why


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from clusterkit import primary

    settings = _settings(args)
    workers = _primary_call(primary.get_workers, settings)
    exits = _last_exits(settings, workers.keys())
    rows = []
    for w in workers.values():
        row = w.to_json()
        ev = exits.get(w.id)
        row["last_exit"] = (
            None
            if ev is None
            else {
                k: ev.to_json()[k]
                for k in (
                    "pid",
                    "code",
                    "signal",
                    "exited_after_disconnect",
                    "invocation_id",
                    "time",
                )
            }
        )
        serving = row["state"] in ("listening", "online")
        row["why"] = None if serving else _why(settings, w.id)
        rows.append(row)
    healthy = bool(rows) and all(row["why"] is None for row in rows)
    if args.json:
        print(json.dumps(rows))
        return 0 if healthy else NOT_HEALTHY
    if not rows:
        print(
            f"no workers of {settings.name} are running (start them: clusterkit start "
            f"{settings.name})"
        )
        return NOT_HEALTHY
    print(f"{'ID':>3} {'PID':>7} {'STATE':<12} {'UPTIME':>8} {'RESTARTS':>8}  LAST EXIT")
    for row in rows:
        last = row["last_exit"]
        if last is None:
            text = "-"
        else:
            how = f"signal {last['signal']}" if last["signal"] else f"code {last['code']}"
            text = f"{how} at {last['time'][:19]}" + (
                " (disconnect)" if last["exited_after_disconnect"] else ""
            )
        print(
            f"{row['id']:>3} {row['pid'] or '-':>7} {row['state']:<12} "
            f"{_uptime(row['uptime']):>8} {row['restarts']:>8}  {text}"
        )
    for row in rows:
        prefix = f"worker {row['id']}: "
        for line in row["why"] or []:  # log lines are the app's: escaped, LF kept under "|"
            print(prefix + terminal.lines(line, continuation=prefix + "|   "))
    return 0 if healthy else NOT_HEALTHY


def _last_log_lines(settings, worker: int, invocation: str | None) -> list[str]:
    from clusterkit import logs

    try:
        return logs.last_lines(settings.name, worker, settings.manager, invocation=invocation)
    except OSError:
        return []  # the journal is not readable here


def _since(args: argparse.Namespace):
    """``--since`` as a datetime (None when not given); exit 2 for anything else."""
    from clusterkit import events

    if not args.since:
        return None
    try:
        return events.parse_since(args.since)
    except ValueError as e:
        raise CommandError(f"--since: {e}", USAGE_ERROR) from None


def _warn_dropped(count: int, when: datetime) -> None:
    """journald dropped records of the service manager: say so among the events."""
    print(
        f"warning: journald dropped {count} of the service manager's records (its rate"
        f" limit) before {when.astimezone():%Y-%m-%d %H:%M:%S}: exits before then may"
        " show as lost (how they ended is unknown)",
        file=sys.stderr,
        flush=True,
    )


def cmd_events(args: argparse.Namespace) -> int:
    import json

    from clusterkit import events

    since = _since(args)
    if args.directory:  # journal files collected from elsewhere: no local cluster needed
        from clusterkit import primary

        settings = primary.Settings(primary.check_name(args.name))
    else:
        settings = _settings(args)
    reader = events.EventReader(
        settings.name,
        manager=settings.manager,
        since=since,
        cursor=args.after_cursor,
        at_end=args.follow and since is None and not args.after_cursor,
        directory=args.directory,
        dropped=_warn_dropped,
    )
    stream = reader.follow() if args.follow else iter(reader)
    try:
        for ev in stream:
            if args.json:
                print(json.dumps(ev.to_json()), flush=True)
                continue
            print(f"{ev.time.astimezone():%Y-%m-%d %H:%M:%S} {ev.describe()}", flush=True)
            if args.logs and ev.event == "exit" and not ev.exited_after_disconnect:
                for line in _last_log_lines(settings, ev.worker, ev.invocation_id):
                    print("    | " + terminal.lines(line, continuation="    |   "), flush=True)
    finally:
        reader.close()
    return 0


def cmd_fork(args: argparse.Namespace) -> int:
    from clusterkit import primary

    settings = _settings(args)
    w = _primary_call(primary.fork, args.env, settings=settings)
    print(f"forked worker {w.id} ({w.unit}, pid {w.pid}): {w.state}")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    from clusterkit import primary

    signal_name = _signal_name(args.signal)
    settings = _settings(args)
    w = primary.Worker(args.id, settings=settings)
    _primary_call(w.kill, signal_name)
    print(f"sent {signal_name} to worker {args.id} ({w.unit})")
    return 0


def _signal_name(text: str) -> str:
    """``9``, ``KILL``, ``kill`` or ``SIGKILL`` -> ``SIGKILL``; exit 2 for anything else."""
    import signal

    word = text.strip().upper()
    try:
        if word.isascii() and word.isdigit():
            return signal.Signals(int(word)).name
        return signal.Signals["SIG" + word.removeprefix("SIG")].name
    except (KeyError, ValueError):
        raise CommandError(
            f"--signal: {text!r} is not a signal (e.g. 9, KILL, SIGTERM)", USAGE_ERROR
        ) from None


def cmd_disconnect(args: argparse.Namespace) -> int:
    from clusterkit import primary

    settings = _settings(args)
    if args.id is None:
        _primary_call(primary.disconnect, settings=settings)
        print(f"disconnected every worker of {settings.name}")
    else:
        w = primary.Worker(args.id, settings=settings)
        _primary_call(w.disconnect)
        print(f"disconnected worker {args.id} ({w.unit})")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from clusterkit import primary

    settings = _settings(args)
    started, stopped = _primary_call(primary.scale, args.count, settings=settings)
    print(
        f"{settings.name}: {args.count} workers"
        f" (started {started or 'none'}, stopped {stopped or 'none'});"
        f" until reboot: {settings.name}.target still starts the generated number"
    )
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from clusterkit import primary
    from clusterkit.spec import SpecError, batch_size

    try:
        batch_size(args.batch, 1)  # bad input exits 2 before anything restarts
    except SpecError as e:
        raise CommandError(str(e), USAGE_ERROR) from None
    settings = _settings(args)

    def progress(old, new, n: int, total: int) -> None:
        print(f"[{n}/{total}] worker {old.id}: pid {old.pid} -> {new.pid} {new.state}", flush=True)

    done = _primary_call(primary.reload, progress, batch=args.batch, settings=settings)
    if not done:
        raise CommandError(f"no running workers of {settings.name} to reload")
    print(f"reloaded {len(done)} workers of {settings.name}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from clusterkit import up

    if args.option_exec is None and args.config is None:
        # No app given: the bundled example, Node's hello-world cluster.js.
        if args.option_name not in (None, "hello"):
            raise CommandError(
                f"--exec: required with --name {args.option_name} (without an app, up runs "
                "the bundled example, as hello); give --exec CMD or --config pyproject.toml",
                USAGE_ERROR,
            )
        example = up.bundled_example()
        if example is None:
            raise CommandError(
                "no app given and the bundled example is not here (installed from a wheel?); "
                'pass --exec "CMD" or --config pyproject.toml',
                USAGE_ERROR,
            )
        args.config = example / "pyproject.toml"
        args.option_name = args.option_name or "hello"
        args.option_exec = f"{sys.executable} {example / 'cluster.py'}"
        args.option_working_directory = args.option_working_directory or str(example)
    args.option_workers = args.option_workers or "auto"
    binds = tuple(os.path.normpath(b) for b in args.bind or ())
    for bind in binds:
        if not bind.startswith("/") or not os.path.isdir(bind):
            raise CommandError(
                f"--bind: {bind} is not an absolute path to a directory", USAGE_ERROR
            )
    return up.up(spec_from_args(args), say=lambda line: print(line, flush=True), binds=binds)


def cmd_logs(args: argparse.Namespace) -> int:
    import json

    from clusterkit import logs

    since = _since(args)
    settings = _settings(args)
    reader = logs.LogReader(
        settings.name,
        manager=settings.manager,
        worker=args.worker,
        since=since,
        lines=None if since else args.lines,
    )
    try:
        for line in reader.follow() if args.follow else reader:
            print(json.dumps(line.to_json()) if args.json else line.describe(), flush=True)
    finally:
        reader.close()
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from clusterkit import primary

    settings = _settings(args)
    _primary_call(primary.start, settings=settings)
    print(f"started {settings.name}: its sockets listen and its workers run")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from clusterkit import primary

    settings = _settings(args)
    _primary_call(primary.stop, settings=settings)
    print(
        f"stopped {settings.name}: workers and sockets (the port is closed until clusterkit start)"
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    import json

    from clusterkit import primary

    rows = [c.to_json() for c in _primary_call(primary.clusters, user=args.user_manager)]
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no clusters here (clusterkit install or clusterkit up starts one)")
        return 0
    print(
        f"{'NAME':<20} {'WHERE':<10} {'WORKERS':>8} {'STATE':<10} {'CPU':>9} {'MEMORY':>9}  LISTEN"
    )
    for r in rows:
        cpu = "-" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.1f}s"
        memory = "-" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.0f}M"
        workers = f"{r['running']}/{r['wanted'] if r['wanted'] is not None else '?'}"
        print(
            f"{r['name']:<20} {r['where']:<10} {workers:>8} {r['state']:<10} {cpu:>9} "
            f"{memory:>9}  {' '.join(r['listen'])}"
        )
    return 0


def _add_primary_parsers(sub) -> None:
    from clusterkit.spec import MAX_WORKERS

    def add(name: str, help: str, func):
        p = sub.add_parser(name, help=help)
        p.add_argument("name", help="cluster name (the NAME of NAME@K.service)")
        p.add_argument(
            "--user",
            dest="user_manager",
            action="store_true",
            help="the calling user's service manager",
        )
        p.set_defaults(func=func)
        return p

    p = add("status", "one row per worker: id, pid, state, uptime, restarts, last exit", cmd_status)
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = add("events", "Node's cluster events from the journal", cmd_events)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument(
        "--since", help="ISO time, @EPOCH, or --since=-5min (also -30s, -2h, -1d); default: all"
    )
    p.add_argument("--after-cursor", metavar="CURSOR", help="resume after this journal cursor")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--directory",
        metavar="DIR",
        help="read the journal files in DIR (e.g. a collector's) instead of this host's journal",
    )
    p.add_argument(
        "--logs",
        action="store_true",
        help="after each exit, the worker's last log lines (why it died, often)",
    )

    p = add("fork", "start the next free worker", cmd_fork)
    p.add_argument(
        "--env", action="append", metavar="KEY=VALUE", help="environment for it; repeatable"
    )

    p = add("kill", "send a signal to one worker's process (systemctl kill)", cmd_kill)
    p.add_argument("id", type=_WORKER_ID, help="worker id")
    p.add_argument(
        "--signal", "-s", default="SIGTERM", help="signal name or number (default SIGTERM)"
    )

    p = add("disconnect", "gracefully stop one worker, or all", cmd_disconnect)
    p.add_argument("id", type=_WORKER_ID, nargs="?", help="worker id (default: every worker)")

    p = add("scale", "run exactly N workers (until reboot)", cmd_scale)
    p.add_argument(
        "count", type=_number(0, MAX_WORKERS, f"a number of workers (0-{MAX_WORKERS})"), metavar="N"
    )

    p = add("reload", "rolling restart, a batch at a time, no refused connections", cmd_reload)
    p.add_argument(
        "--batch",
        default="1",
        metavar="N|P%",
        help="workers restarted at once: a count or a percentage of the running ones (default 1)",
    )

    p = add("logs", "what the workers printed and logged, from the journal", cmd_logs)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    p.add_argument("--worker", type=_WORKER_ID, metavar="K", help="only worker K")
    p.add_argument("--since", help="ISO time, @EPOCH, or --since=-5min; default: the last lines")
    p.add_argument(
        "--lines",
        "-n",
        type=_number(1, 1_000_000, "a number of lines (1-1000000)"),
        default=50,
        help="how many (default 50)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    add("start", "open the cluster's sockets and start its workers", cmd_start)
    add("stop", "stop the workers and close the port (sockets too) until start", cmd_stop)

    p = sub.add_parser("ls", help="every cluster on this host: workers, state, CPU, memory, port")
    p.add_argument(
        "--user",
        dest="user_manager",
        action="store_true",
        help="the calling user's service manager",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_ls)


def _add_manager_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        action="store_true",
        help="use /run/systemd/system (gone at reboot) instead of /etc/systemd/system",
    )
    p.add_argument(
        "--user",
        dest="user_manager",
        action="store_true",
        help="the calling user's service manager (~/.config/systemd/user)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="clusterkit",
        description="Node's cluster module for Python, with systemd as the primary.",
    )
    parser.add_argument("--version", action="version", version=f"clusterkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("generate", help="render the systemd units of a cluster")
    _add_spec_options(p)
    p.add_argument("--output", type=Path, default=Path("units"), help="directory (default units/)")
    p.add_argument("--force", action="store_true", help="overwrite files edited by hand")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("install", help="install generated units, daemon-reload, enable")
    p.add_argument("name", nargs="?", help="cluster name (default: every cluster in --from)")
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=Path("units"),
        help="directory with generated units (default units/)",
    )
    p.add_argument("--now", action="store_true", help="also start NAME.target")
    p.add_argument(
        "--json", action="store_true", help="one JSON object per cluster, with changed: true/false"
    )
    p.add_argument("--force", action="store_true", help="overwrite installed files edited by hand")
    _add_manager_options(p)
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("uninstall", help="stop, disable and remove an installed cluster")
    p.add_argument("name")
    _add_manager_options(p)
    p.set_defaults(func=cmd_uninstall)

    p = sub.add_parser(
        "up",
        help="render and run a cluster on real systemd in the foreground "
        "(a throwaway container where systemd is not PID 1); Ctrl-C stops it",
    )
    _add_spec_options(p)
    p.add_argument(
        "--bind",
        action="append",
        metavar="DIR",
        help="one more directory the container sees, read-only (the program's, the working "
        "directory and the checkout are bound already); repeatable",
    )
    p.set_defaults(func=cmd_up)

    _add_primary_parsers(sub)
    from clusterkit import fleet_cli

    fleet_cli.add_parser(sub)
    return parser


def _refuse_untrusted_code(reason: str) -> int:
    print(
        f"clusterkit: not running as root from code another user can change: "
        f"{terminal.lines(reason, '')}; install clusterkit where only root can write (a "
        "venv of root's, such as /opt/clusterkit, as the fleet role does) and run that",
        file=sys.stderr,
    )
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if trust.as_root():
        if (reason := trust.why_code_untrusted()) is not None:
            return _refuse_untrusted_code(reason)
        trust.guard_imports()
    try:
        return args.func(args)
    except trust.UntrustedCode as e:
        return _refuse_untrusted_code(str(e))
    except CommandError as e:
        # escaped: a message can quote a name or path anyone chose (a planted file's)
        print(f"clusterkit {args.command}: {terminal.lines(str(e), '')}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the imported module's main: subcommand modules (fleet_cli) raise its CommandError,
    # not a copy defined in __main__.
    from clusterkit.cli import main as _main

    sys.exit(_main())
