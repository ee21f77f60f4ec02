"""One cluster's settings, given to ``clusterkit generate`` as flags or as [tool.clusterkit].

Settings are a dict keyed like [tool.clusterkit] (``"exec"`` a list, ``"env"``
a dict, ``"listen"`` a list); both spellings carry exactly the same values.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import tomllib
from pathlib import Path
from typing import Any

from clusterkit.cli import main


def as_flags(settings: dict[str, Any]) -> list[str]:
    """The ``generate`` flags for these settings."""
    argv: list[str] = []
    for key, value in settings.items():
        if key == "exec" and isinstance(value, list):
            argv += ["--exec", shlex.join(value)]  # split back by the POSIX rules
        elif key == "env" and isinstance(value, dict):
            argv += [x for k, v in value.items() for x in ("--env", f"{k}={v}")]
        elif isinstance(value, list):
            argv += [x for item in value for x in (f"--{key}", str(item))]
        elif isinstance(value, bool):
            argv += [f"--{key}"] if value else []
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _toml_char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    return c if c.isprintable() else f"\\U{ord(c):08X}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(map(_toml_char, value)) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def as_toml(settings: dict[str, Any]) -> str:
    """A pyproject.toml whose [tool.clusterkit] holds exactly these settings."""
    text = "[tool.clusterkit]\n" + "".join(
        f'"{k}" = {_toml_value(v)}\n' for k, v in settings.items()
    )
    assert tomllib.loads(text)["tool"]["clusterkit"] == settings, text
    return text


def generate(out: Path, settings: dict[str, Any], *, via: str) -> tuple[int, str]:
    """Run ``clusterkit generate`` in-process with the settings ``via`` flags or config.

    Returns (exit status, stderr). A config file is always given explicitly, so
    the caller's ./pyproject.toml never leaks in.
    """
    config = out.parent / f"{out.name}.toml"
    if via == "flags":
        config.write_text("")
        argv = as_flags(settings)
    else:
        config.write_text(as_toml(settings), encoding="utf-8")
        argv = []
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = main(["generate", "--config", str(config), "--output", str(out), *argv])
    return status, stderr.getvalue()
