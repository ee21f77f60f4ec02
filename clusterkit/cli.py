"""The ``clusterkit`` command.

Bad input gets one line on stderr naming the problem and exit status 2,
before anything is written. Failures of the system (systemd not running, a
unit that failed) exit 1 with a line that says what to do next.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from clusterkit import __version__

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


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    """The settings of a cluster; each also a key of [tool.clusterkit]."""
    p.add_argument(
        "--config",
        type=Path,
        help="pyproject.toml with a [tool.clusterkit] table "
        "(default: ./pyproject.toml when it has one)",
    )
    p.add_argument("--name", help="cluster name: units NAME.socket, NAME@.service, NAME.target")
    p.add_argument(
        "--exec",
        help="worker command, split like a POSIX shell without expansion, "
        'e.g. "/srv/app/.venv/bin/python /srv/app/server.py"',
    )
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDRESS",
        help="PORT, IPv4:PORT, [IPv6]:PORT or /absolute/unix/path; repeatable (default 3000)",
    )
    p.add_argument(
        "--workers",
        metavar="auto|N",
        help="worker count; auto = one per CPU of the host that runs the units",
    )
    p.add_argument(
        "--scheduling",
        metavar="shared|reuseport",
        help="shared: one socket all workers accept on (default); "
        "reuseport: one SO_REUSEPORT socket per worker",
    )
    p.add_argument("--user", help="run workers as this user (default: DynamicUser=yes)")
    p.add_argument("--group", help="run workers with this group (needs --user)")
    p.add_argument("--working-directory", metavar="DIR", help="WorkingDirectory= of the workers")
    p.add_argument(
        "--env",
        action="append",
        metavar="KEY=VALUE",
        help="environment variable for the workers; repeatable",
    )
    p.add_argument("--restart", help="Restart= policy (default always)")
    p.add_argument("--restart-sec", metavar="SECONDS", help="RestartSec= (default 1)")
    p.add_argument(
        "--stop-timeout",
        metavar="SECONDS",
        help="time a stopping worker gets to finish in-flight requests (default 30)",
    )
    p.add_argument(
        "--watchdog-sec",
        metavar="SECONDS",
        help="WatchdogSec=: kill a worker that stops pinging (default 0, off)",
    )
    p.add_argument(
        "--cpu-affinity",
        action="store_const",
        const=True,
        default=None,
        help="pin worker K to CPU K (CPUAffinity=%%i)",
    )
    p.add_argument("--memory-max", metavar="SIZE", help="MemoryMax= per worker, e.g. 512M")
    p.add_argument(
        "--type",
        metavar="notify|exec|simple",
        help="service Type=; notify (default) needs READY=1 from the worker",
    )
    p.add_argument(
        "--hardening", metavar="strict|default|none", help="sandbox level (default: default)"
    )
    p.add_argument(
        "--manager",
        metavar="system|user",
        help="the service manager the units are for (default system)",
    )
    p.add_argument(
        "--python",
        metavar="PATH",
        help="Python with clusterkit, runs the exit reporter (default: this one)",
    )
    p.add_argument("--description", help="Description= of the units")


def _flags(args: argparse.Namespace) -> dict[str, object]:
    return {
        "name": args.name,
        "exec": args.exec,
        "listen": args.listen,
        "workers": args.workers,
        "scheduling": args.scheduling,
        "user": args.user,
        "group": args.group,
        "working-directory": args.working_directory,
        "env": args.env,
        "restart": args.restart,
        "restart-sec": args.restart_sec,
        "stop-timeout": args.stop_timeout,
        "watchdog-sec": args.watchdog_sec,
        "cpu-affinity": args.cpu_affinity,
        "memory-max": args.memory_max,
        "type": args.type,
        "hardening": args.hardening,
        "manager": args.manager,
        "python": args.python,
        "description": args.description,
    }


def spec_from_args(args: argparse.Namespace):
    """The validated Spec for these arguments (and their config file)."""
    from clusterkit.spec import SpecError, build_spec, load_config

    try:
        config_path = args.config
        if config_path is None and Path("pyproject.toml").is_file():
            config_path = Path("pyproject.toml")
        config = load_config(config_path) if config_path is not None else {}
        return build_spec(config, _flags(args))
    except SpecError as e:
        raise CommandError(str(e), USAGE_ERROR) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from clusterkit import render, unitfiles

    spec = spec_from_args(args)
    texts = render.render(spec)
    files = {
        name: unitfiles.with_header(name, text, shebang=text.startswith("#!"))
        for name, text in texts.items()
    }
    possible = [
        f"{spec.name}.socket",
        f"{spec.name}@.socket",
        f"{spec.name}@.service",
        f"{spec.name}.target",
        f"{render.GENERATOR_PREFIX}{spec.name}",
    ]
    stale = tuple(n for n in possible if n not in files and (args.output / n).exists())
    try:
        result = unitfiles.write_all(
            args.output,
            files,
            force=args.force,
            stale=stale,
            executable=tuple(n for n in files if n.startswith(render.GENERATOR_PREFIX)),
        )
    except unitfiles.HandEditedError as e:
        raise CommandError(str(e)) from None
    except OSError as e:
        raise CommandError(f"--output: cannot write {args.output}: {e.strerror}") from None
    for name in result.written:
        print(f"wrote {args.output / name}")
    for name in result.unchanged:
        print(f"unchanged {args.output / name}")
    for name in result.removed:
        print(f"removed {args.output / name} (no longer part of this cluster)")
    return 0


def _manager(args: argparse.Namespace):
    from clusterkit.install import Manager

    if args.runtime and args.user_manager:
        raise CommandError("--runtime and --user cannot be combined", USAGE_ERROR)
    return Manager.for_scope(runtime=args.runtime, user=args.user_manager)


def cmd_install(args: argparse.Namespace) -> int:
    from clusterkit import install, unitfiles

    manager = _manager(args)
    if not args.source.is_dir():
        raise CommandError(f"--from: {args.source} is not a directory", USAGE_ERROR)
    names = [args.name] if args.name else install.clusters_in(args.source)
    if not names:
        raise CommandError(f"--from: no clusterkit units in {args.source}; run clusterkit generate")
    for name in names:
        try:
            files = install.install(args.source, name, manager, force=args.force, now=args.now)
        except (install.InstallError, unitfiles.HandEditedError) as e:
            raise CommandError(str(e)) from None
        print(f"installed {name}: {', '.join(files)} into {manager.unit_dir}")
        if args.now:
            print(f"started {name}.target")
        else:
            print(f"start it with: {' '.join(manager.systemctl)} start {name}.target")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from clusterkit import install

    manager = _manager(args)
    try:
        removed = install.uninstall(args.name, manager)
    except install.InstallError as e:
        raise CommandError(str(e)) from None
    print(f"uninstalled {args.name}: removed {', '.join(removed)}")
    print(f"drop-ins under {manager.unit_dir}/{args.name}@.service.d/ (if any) were kept")
    return 0


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
    p.add_argument("--force", action="store_true", help="overwrite installed files edited by hand")
    _add_manager_options(p)
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("uninstall", help="stop, disable and remove an installed cluster")
    p.add_argument("name")
    _add_manager_options(p)
    p.set_defaults(func=cmd_uninstall)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CommandError as e:
        print(f"clusterkit {args.command}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
