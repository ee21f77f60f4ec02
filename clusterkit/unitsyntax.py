"""systemd's quoting rules, for every value clusterkit writes into a unit or drop-in.

systemd.service(5) "Command lines" and systemd.unit(5) "Specifiers": a value the
user wrote must reach the worker byte for byte. Stdlib only, so the primary can
write drop-ins without loading the templates.
"""

from __future__ import annotations


def specifiers(value: str) -> str:
    """Escape systemd's %-specifiers."""
    return value.replace("%", "%%")


def _c_quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def exec_arg(arg: str) -> str:
    """One argv word for ExecStart=: C-quoted, with % and $ escaped (no expansion)."""
    return '"' + specifiers(_c_quoted(arg)).replace("$", "$$") + '"'


def exec_args(argv: tuple[str, ...]) -> str:
    """Every word of argv as an argument (none as the program): what follows
    ``/bin/sh -c SCRIPT NAME`` when a script runs before the command."""
    return " ".join(exec_arg(a) for a in argv)


def env_assignment(assignment: str) -> str:
    """A KEY=VALUE for Environment=: C-quoted, % escaped (Environment= does not expand $)."""
    return '"' + specifiers(_c_quoted(assignment)) + '"'
