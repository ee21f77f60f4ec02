"""Spec -> unit file texts, through the Jinja2 templates in ``templates/``.

Nothing else renders a unit. The filters below are systemd's quoting rules
(systemd.service(5) "Command lines", systemd.unit(5) "Specifiers"), so a value
the user wrote reaches the worker byte for byte.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import jinja2

from clusterkit.spec import FD_NAME, Spec

GENERATOR_PREFIX = "clusterkit-"


def templates_dir() -> Path:
    """The templates: inside the installed wheel, or the checkout's top-level templates/."""
    packaged = Path(str(resources.files("clusterkit"))) / "templates"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "templates"


def specifiers(value: str) -> str:
    """Escape systemd's %-specifiers."""
    return value.replace("%", "%%")


def exec_arg(arg: str) -> str:
    """One argv word for ExecStart=: C-quoted, with % and $ escaped (no expansion)."""
    quoted = arg.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + specifiers(quoted).replace("$", "$$") + '"'


def exec_line(argv: tuple[str, ...]) -> str:
    # The program stays unquoted: systemd reads prefixes such as "+" and "-" from it.
    return " ".join([specifiers(argv[0]).replace("$", "$$")] + [exec_arg(a) for a in argv[1:]])


def env_assignment(assignment: str) -> str:
    """A KEY=VALUE for Environment=: C-quoted, % escaped (Environment= does not expand $)."""
    return '"' + specifiers(assignment.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def seconds(value: float) -> str:
    return f"{value:g}s" if value >= 1 or value == 0 else f"{round(value * 1000)}ms"


def seconds_number(value: float) -> str:
    return f"{value:g}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(
        specifiers=specifiers,
        exec_arg=exec_arg,
        exec_line=exec_line,
        env_assignment=env_assignment,
        seconds=seconds,
        seconds_number=seconds_number,
    )
    return env


def unit_names(spec: Spec) -> dict[str, str]:
    """File name -> template name, for this spec's scheduling mode."""
    socket = f"{spec.name}.socket" if spec.scheduling == "shared" else f"{spec.name}@.socket"
    names = {
        socket: "socket.j2",
        f"{spec.name}@.service": "service.j2",
        f"{spec.name}.target": "target.j2",
    }
    if spec.workers is None:
        names[GENERATOR_PREFIX + spec.name] = "generator.j2"
    return names


def render(spec: Spec) -> dict[str, str]:
    """Every file for this spec: its name -> its text."""
    env = _environment()
    context = {
        "spec": spec,
        "fd_name": FD_NAME,
        "description": spec.description or f"clusterkit cluster {spec.name}",
    }
    return {
        name: _tidy(env.get_template(template).render(context))
        for name, template in unit_names(spec).items()
    }


def _tidy(text: str) -> str:
    # Conditional blocks leave runs of blank lines; keep at most one.
    lines: list[str] = []
    for line in text.splitlines():
        if line == "" and (not lines or lines[-1] == ""):
            continue
        lines.append(line)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"
