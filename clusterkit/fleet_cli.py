"""``clusterkit fleet …``: one cluster on several hosts (see :mod:`clusterkit.fleet`).

Every subcommand reads ``[tool.clusterkit]`` and ``[tool.clusterkit.fleet]`` from
``--config`` (default ``./pyproject.toml``); ``--inventory`` takes the hosts from
an Ansible inventory instead (group ``clusterkit``). Bad input: exit 2, one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from clusterkit import terminal


def _fleet(args: argparse.Namespace):
    from clusterkit.cli import USAGE_ERROR, CommandError, config_path
    from clusterkit.fleet import FleetFailure
    from clusterkit.fleetspec import FleetError, load_fleet

    # as root, ./pyproject.toml only if it is root's: its fleet table names the inventory
    # that ansible-inventory runs, the ssh key, the hosts and what they install
    config = config_path(args) or Path("pyproject.toml")
    if not config.is_file():
        raise CommandError(f"--config: {config} is not a file", USAGE_ERROR)
    try:
        return load_fleet(config, args.inventory)
    except FleetError as e:
        raise CommandError(str(e), USAGE_ERROR) from None
    except FleetFailure as e:  # ansible-inventory is missing
        raise CommandError(str(e)) from None
    except (OSError, ValueError) as e:
        raise CommandError(f"--config: {config}: {e}", USAGE_ERROR) from None


def _failure(call, *a, **kw):
    from clusterkit.cli import CommandError
    from clusterkit.fleet import FleetFailure

    try:
        return call(*a, **kw)
    except FleetFailure as e:
        raise CommandError(str(e)) from None


def _play(args: argparse.Namespace, playbook: str, **extra: object) -> int:
    from clusterkit.cli import CommandError
    from clusterkit.fleet import Runner

    fleet = _fleet(args)
    with _failure(Runner, fleet) as runner:
        r = _failure(runner.play, playbook, **extra)
    if r.returncode != 0:
        raise CommandError(
            f"ansible-playbook {playbook}.yml failed (exit {r.returncode}); see above"
        )
    return 0


@contextlib.contextmanager
def _bad_input() -> Iterator[None]:
    """A FleetError from checking a flag, as the one-line exit 2 of bad input."""
    from clusterkit.cli import USAGE_ERROR, CommandError
    from clusterkit.fleetspec import FleetError

    try:
        yield
    except FleetError as e:
        raise CommandError(str(e), USAGE_ERROR) from None


def _haproxy_config(fleet, flag: str, bind: str) -> str:
    from clusterkit.fleet import haproxy_config
    from clusterkit.fleetspec import haproxy_bind

    with _bad_input():
        haproxy_bind(flag, bind)
    return haproxy_config(fleet, bind, str(fleet.haproxy_socket or "") or None)


def _write_haproxy_config(flag: str, path: Path, text: str, force: bool) -> None:
    """Atomically, and never over a file clusterkit did not write (or, without --force, one
    edited by hand since): HAProxy's config is often the operator's own /etc/haproxy/haproxy.cfg."""
    from clusterkit import unitfiles
    from clusterkit.cli import USAGE_ERROR, CommandError

    try:
        result = unitfiles.write_all(path.parent, {path.name: text}, force=force)
    except unitfiles.HandEditedError as e:
        raise CommandError(f"{flag}: {e}") from None
    except unitfiles.UnsafePathError as e:
        raise CommandError(f"{flag}: {e}", USAGE_ERROR) from None
    except OSError as e:
        raise CommandError(f"{flag}: cannot write {path}: {e.strerror}") from None
    print(f"{'wrote' if result.written else 'unchanged'} {path}")


def cmd_install(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    if args.haproxy_config is not None:
        text = _haproxy_config(fleet, "--haproxy-bind", args.haproxy_bind)
        _write_haproxy_config("--haproxy-config", args.haproxy_config, text, args.force)
    return _play(args, "install")


def cmd_haproxy_config(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    text = _haproxy_config(fleet, "--bind", args.bind)
    if args.output is None:
        sys.stdout.write(text)
    else:
        _write_haproxy_config("--output", args.output, text, args.force)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from clusterkit import fleet as fl
    from clusterkit.cli import NOT_HEALTHY

    fleet = _fleet(args)
    rows, failure = _failure(fl.status, fleet)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            ha = row["haproxy"] or {}
            workers = row["workers"]
            if workers is None:
                state = "UNREACHABLE"
            else:
                states = [w["state"] for w in workers]
                state = f"{states.count('listening')}/{len(states)} workers listening"
            print(
                f"{row['host']:<20} {row['address']:<16} {state:<28} "
                f"haproxy {ha.get('status', '-')} {ha.get('check', '') or ''}"
                f" {ha.get('sessions', '')}"
            )
    if failure:
        sys.stderr.write(failure)
        return 1
    # as `clusterkit status`: 3 when some worker does not serve (or a host runs none)
    serving = all(
        row["workers"] and all(w.get("why") is None for w in row["workers"]) for row in rows
    )
    return 0 if serving else NOT_HEALTHY


def cmd_reload(args: argparse.Namespace) -> int:
    return _play(args, "reload")


def cmd_restart_hosts(args: argparse.Namespace) -> int:
    extra: dict[str, object] = {"clusterkit_restart": "units"}
    if args.reboot:
        extra["clusterkit_restart"] = "reboot"
    elif args.command:
        extra = {"clusterkit_restart": "command", "clusterkit_restart_command": args.command}
    return _play(args, "restart-hosts", **extra)


def _stream(args: argparse.Namespace, logs: bool) -> int:
    from clusterkit.cli import CommandError
    from clusterkit.fleet import FleetEvents, FleetFailure

    fleet = _fleet(args)
    reader = FleetEvents(fleet, logs=logs)
    warned: set[str] = set()

    def warn() -> None:
        for address in sorted(reader.strangers - warned):
            print(
                f"clusterkit fleet: ignoring records uploaded from {address}, "
                "which is not a host of the inventory",
                file=sys.stderr,
            )
            warned.add(address)

    try:
        for item in reader.follow() if args.follow else iter(reader.read()):
            warn()
            if args.json:
                print(json.dumps(item), flush=True)
            elif logs:
                message = terminal.lines(str(item["message"]), continuation="    ")
                print(f"{item['time'][:19]} {item['host']} {item['unit']}: {message}", flush=True)
            else:
                print(f"{item['time'][:19]} {item['host']} {_describe(item)}", flush=True)
    except FleetFailure as e:
        raise CommandError(str(e)) from None
    except KeyboardInterrupt:
        pass
    finally:
        reader.close()
    warn()
    return 0


def _describe(item: dict) -> str:
    who = f"worker {item['worker']}" + (f" (pid {item['pid']})" if item.get("pid") else "")
    if item["event"] == "exit":
        how = f"signal {item['signal']}" if item["signal"] else f"code {item['code']}"
        verb = "exited after disconnect" if item["exited_after_disconnect"] else "died"
        return f"{who} {verb}: {how}"
    return f"{who} {item['event']}"


def cmd_events(args: argparse.Namespace) -> int:
    return _stream(args, logs=False)


def cmd_logs(args: argparse.Namespace) -> int:
    return _stream(args, logs=True)


def cmd_lb(args: argparse.Namespace) -> int:
    from clusterkit.cli import USAGE_ERROR, CommandError
    from clusterkit.fleet import HAProxy
    from clusterkit.fleetspec import haproxy_name

    with _bad_input():
        haproxy_name("SERVER", args.server)
        haproxy_name("--backend", args.backend)
    if not 0 < args.timeout <= 3600:  # also false for NaN
        raise CommandError(f"--timeout: {args.timeout:g} is outside 0-3600 seconds", USAGE_ERROR)
    lb = HAProxy(args.socket, args.backend)
    if args.action == "drain":
        _failure(lb.drain, args.server, args.timeout)
        print(f"{args.backend}/{args.server}: drained, 0 sessions")
    elif args.action == "ready":
        _failure(lb.ready, args.server, args.timeout)
        print(f"{args.backend}/{args.server}: ready and UP")
    else:
        print(json.dumps(_failure(lb.server, args.server)))
    return 0


def cmd_roles_path(args: argparse.Namespace) -> int:
    from clusterkit.fleet import PLAYBOOK_DIR

    print(PLAYBOOK_DIR / "roles")
    return 0


def add_parser(sub) -> None:
    """``clusterkit fleet`` and its subcommands, on the main parser's subparsers."""
    fleet = sub.add_parser("fleet", help="one cluster on several hosts (Ansible, HAProxy)")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, parser_class=type(fleet))

    def add(name: str, help: str, func):
        p = fsub.add_parser(name, help=help)
        p.add_argument(
            "--config",
            type=Path,
            help="pyproject.toml with [tool.clusterkit] and [tool.clusterkit.fleet] "
            "(default ./pyproject.toml)",
        )
        p.add_argument("--inventory", "-i", type=Path, help="Ansible inventory (group clusterkit)")
        p.set_defaults(func=func)
        return p

    p = add(
        "install", "install and start the cluster on every host (ansible-playbook)", cmd_install
    )
    p.add_argument(
        "--haproxy-config", type=Path, metavar="FILE", help="also write HAProxy's config"
    )
    p.add_argument("--haproxy-bind", default="*:80", help="HAProxy's frontend address (*:80)")
    p.add_argument(
        "--force", action="store_true", help="overwrite a --haproxy-config file edited by hand"
    )

    p = add("haproxy-config", "print HAProxy's configuration for the hosts", cmd_haproxy_config)
    p.add_argument("--bind", default="*:80", help="the frontend's bind address (default *:80)")
    p.add_argument("--output", "-o", type=Path, help="write it to FILE")
    p.add_argument("--force", action="store_true", help="overwrite a FILE edited by hand")

    p = add("status", "every host's workers and HAProxy's view of it", cmd_status)
    p.add_argument("--json", action="store_true", help="a JSON list, one object per host")

    add("reload", "clusterkit reload on one host at a time (no drain needed)", cmd_reload)

    p = add(
        "restart-hosts",
        "one host at a time: drain in HAProxy, restart the cluster's units, ready",
        cmd_restart_hosts,
    )
    p.add_argument("--reboot", action="store_true", help="reboot each host instead")
    p.add_argument("--command", help="run this shell command on each host instead")

    for name, func, help in (
        ("events", cmd_events, "exit events of every host, from the collector"),
        ("logs", cmd_logs, "the workers' log lines of every host, from the collector"),
    ):
        p = add(name, help, func)
        p.add_argument("--follow", "-f", action="store_true", help="keep printing new ones")
        p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = fsub.add_parser("lb", help="HAProxy runtime API: drain, ready or show one server")
    p.add_argument("action", choices=("drain", "ready", "show"))
    p.add_argument("server", help="the server (the host's inventory name)")
    p.add_argument("--socket", type=Path, required=True, help="HAProxy's runtime API socket")
    p.add_argument("--backend", required=True)
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait (default 60)")
    p.set_defaults(func=cmd_lb)

    p = fsub.add_parser(
        "roles-path", help="where the shipped Ansible roles are (ANSIBLE_ROLES_PATH)"
    )
    p.set_defaults(func=cmd_roles_path)
