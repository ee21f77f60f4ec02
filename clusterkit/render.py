"""Spec -> unit file texts, through the Jinja2 templates in ``templates/``.

Nothing else renders a unit. The templates quote every value with
:mod:`clusterkit.unitsyntax`, so a value the user wrote reaches the worker byte
for byte. :func:`write` adds clusterkit's header and writes the files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import jinja2

from clusterkit import backoff, manifest, report, unitfiles
from clusterkit.names import back_off
from clusterkit.names import files as unit_files
from clusterkit.spec import FD_NAME, Spec
from clusterkit.unitsyntax import env_assignment, exec_args, specifiers

GENERATOR_PREFIX = "clusterkit-"


def templates_dir() -> Path:
    """The templates: inside the installed wheel, or the checkout's top-level templates/."""
    packaged = Path(str(resources.files("clusterkit"))) / "templates"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "templates"


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
        exec_args=exec_args,
        env_assignment=env_assignment,
        seconds=seconds,
        seconds_number=seconds_number,
    )
    return env


def file_names(name: str) -> tuple[str, ...]:
    """Every file a cluster ``name`` can have, in either scheduling mode, manifest included."""
    return (*unit_files(name), manifest.file_name(name))


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
    names[back_off(spec.name)] = "backoff.service.j2"
    return names


def render(spec: Spec) -> dict[str, str]:
    """Every file for this spec: its name -> its text."""
    env = _environment()
    context = {
        "spec": spec,
        "fd_name": FD_NAME,
        "description": spec.description or f"clusterkit cluster {spec.name}",
        # shell scripts in the unit: systemd must leave every $ to the shell (its
        # %-specifiers are meant for systemd)
        "start_script": _for_systemd(f'{report.started_shell_command()}; exec "$@"'),
        "back_off_unit": back_off(spec.name, "%i"),
        "back_off_script": _for_systemd(
            backoff.shell_script(
                spec.name, user=spec.manager == "user", restart_always=spec.restart == "always"
            )
        ),
    }
    return {
        name: _tidy(env.get_template(template).render(context))
        for name, template in unit_names(spec).items()
    }


def hardening(spec: Spec) -> str:
    """The sandbox lines of this spec's service, alone (bench/sandbox_cost.py times them)."""
    return _tidy(_environment().get_template("hardening.j2").render(spec=spec))


def _for_systemd(script: str) -> str:
    # one single-quoted word of a command line: no quote or backslash of its own
    assert "'" not in script and "\\" not in script, script
    return script.replace("$", "$$")


def _tidy(text: str) -> str:
    # Conditional blocks leave runs of blank lines; keep at most one. Split at
    # "\n" only, as systemd does: str.splitlines() also splits at U+2028 and
    # friends, which would turn part of a value into a line of its own.
    lines: list[str] = []
    for line in text.split("\n"):
        if line == "" and (not lines or lines[-1] == ""):
            continue
        lines.append(line)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def files(spec: Spec) -> dict[str, str]:
    """Every file of ``spec`` with clusterkit's header: units, generator, and the manifest."""
    texts = {
        name: unitfiles.with_header(name, text, shebang=text.startswith("#!"))
        for name, text in render(spec).items()
    }
    spec_file = manifest.file_name(spec.name)
    texts[spec_file] = unitfiles.with_header(spec_file, manifest.dumps(spec))
    return texts


FORK_DROPIN = "50-clusterkit-fork.conf"


def fork_dropin(env: tuple[tuple[str, str], ...]) -> str:
    """The drop-in giving one forked worker ``env`` (checked pairs), with clusterkit's header."""
    text = _environment().get_template("fork.conf.j2").render(env=env)
    return unitfiles.with_header(FORK_DROPIN, _tidy(text))


def write(spec: Spec, directory: Path, *, force: bool = False) -> unitfiles.WriteResult:
    """Render ``spec`` into ``directory`` as one set; drop files it no longer has.

    Raises :class:`unitfiles.HandEditedError` (nothing written) over a hand edit,
    :class:`unitfiles.UnsafePathError` for a symlinked directory.
    """
    texts = files(spec)
    stale = tuple(n for n in file_names(spec.name) if n not in texts)
    generators = tuple(n for n in texts if n.startswith(GENERATOR_PREFIX))
    return unitfiles.write_all(directory, texts, force=force, stale=stale, executable=generators)


def render_template(template: str, **context: object) -> str:
    """Render one of the other templates (``haproxy.cfg.j2`` for ``clusterkit fleet``)."""
    return _tidy(_environment().get_template(template).render(context))
