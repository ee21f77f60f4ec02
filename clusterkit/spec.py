"""The cluster spec: the one place that checks input.

CLI flags and ``[tool.clusterkit]`` in a ``pyproject.toml`` are merged here
(flags win) into one frozen :class:`Spec`. Everything downstream (templates,
unit files, install) trusts it. Every error is a :class:`SpecError` whose
message names the field, so the CLI can print it on one line and exit 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_WORKERS = 1024
FD_NAME = "http"  # FileDescriptorName= of every listening socket: what workers look up
SCHEDULING_MODES = ("shared", "reuseport")
SERVICE_TYPES = ("notify", "exec", "simple")
RESTART_POLICIES = ("always", "on-failure", "on-abnormal", "on-abort", "on-watchdog", "no")
HARDENING_LEVELS = ("strict", "default", "none")
MANAGERS = ("system", "user")

# A safe subset of systemd's unit-name alphabet: "@" and "\\" mean something in
# unit names, and ":" confuses tools that take "host:path" arguments.
_UNIT_PREFIX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]*\$?")
_MEMORY = re.compile(r"(\d+[KMGT]?|\d{1,2}%|100%|infinity)")
_UNIT_NAME_MAX = 255 - len("@1024.service")
_SUN_PATH_MAX = 107


class SpecError(ValueError):
    """Bad input: the message names the field and what is wrong with it."""


@dataclass(frozen=True)
class Listen:
    """One listening address, as systemd's ListenStream= spells it."""

    address: str  # "3000", "127.0.0.1:3000", "[::1]:3000" or "/run/app.sock"
    port: int | None  # None for a unix socket

    @property
    def is_unix(self) -> bool:
        return self.port is None


@dataclass(frozen=True)
class Spec:
    name: str
    exec: tuple[str, ...]
    listen: tuple[Listen, ...] = (Listen("3000", 3000),)
    workers: int | None = None  # None means "auto": one per CPU of the host that runs the units
    scheduling: str = "shared"
    user: str | None = None  # None: DynamicUser=yes
    group: str | None = None
    working_directory: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    env_file: str | None = None  # EnvironmentFile= for secrets: root-owned, mode 0600
    restart: str = "always"
    restart_sec: float = 1.0
    stop_timeout_sec: float = 30.0
    watchdog_sec: float = 0.0  # 0: no watchdog
    cpu_affinity: bool = False
    memory_max: str | None = None
    type: str = "notify"
    hardening: str = "default"
    manager: str = "system"  # the systemd instance the units are for
    python: str = field(default_factory=lambda: sys.executable)  # runs the exit reporter
    description: str | None = None

    @property
    def worker_ids(self) -> range | None:
        return None if self.workers is None else range(self.workers)


# Every settable field: its flag/config key, and the parser that checks it.
# Keys in [tool.clusterkit] are spelled like the long flags, without "--".
def _fields() -> dict[str, tuple[str, Any]]:
    return {
        "name": ("name", _parse_name),
        "exec": ("exec", _parse_exec),
        "listen": ("listen", _parse_listen),
        "workers": ("workers", _parse_workers),
        "scheduling": ("scheduling", _choice(SCHEDULING_MODES)),
        "user": ("user", _parse_user),
        "group": ("group", _parse_user),
        "working-directory": ("working_directory", _parse_abs_path),
        "env": ("env", _parse_env),
        "env-file": ("env_file", _parse_env_file),
        "restart": ("restart", _choice(RESTART_POLICIES)),
        "restart-sec": ("restart_sec", _seconds(minimum=0.0)),
        "stop-timeout": ("stop_timeout_sec", _seconds(minimum=0.1)),
        "watchdog-sec": ("watchdog_sec", _seconds(minimum=0.0)),
        "cpu-affinity": ("cpu_affinity", _parse_bool),
        "memory-max": ("memory_max", _parse_memory),
        "type": ("type", _choice(SERVICE_TYPES)),
        "hardening": ("hardening", _choice(HARDENING_LEVELS)),
        "manager": ("manager", _choice(MANAGERS)),
        "python": ("python", _parse_python),
        "description": ("description", _text),
    }


def build_spec(config: Mapping[str, Any], flags: Mapping[str, Any]) -> Spec:
    """Merge config-file values and flags (flags win; None means not given) into a Spec."""
    fields = _fields()
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise SpecError(
            f"[tool.clusterkit]: unknown key {unknown[0]!r} (known: {', '.join(fields)})"
        )
    values: dict[str, Any] = {}
    for key, (attr, parse) in fields.items():
        raw = flags.get(key)
        if raw is None:
            raw = config.get(key)
        if raw is None:
            continue
        values[attr] = parse(key, raw)
    for required in ("name", "exec"):
        if required not in values:
            raise SpecError(
                f"--{required}: required (give the flag or set it in [tool.clusterkit])"
            )
    if values.get("manager") == "user":
        # A user's manager cannot switch users or build the sandbox (no privileges).
        if values.setdefault("hardening", "none") != "none":
            raise SpecError("--hardening: a user's service manager cannot sandbox; use none")
    spec = Spec(**values)
    _check_combination(spec)
    return spec


def load_config(path: Path) -> dict[str, Any]:
    """The [tool.clusterkit] table of a pyproject.toml ({} when the file has none)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"--config: cannot read {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"--config: {path} is not valid TOML: {e}") from None
    table = data.get("tool", {}).get("clusterkit", {})
    if not isinstance(table, dict):
        raise SpecError(f"--config: [tool.clusterkit] in {path} must be a table")
    # [tool.clusterkit.fleet] is the fleet's table, checked by clusterkit.fleetspec
    return {k: v for k, v in table.items() if k != "fleet"}


def _check_combination(spec: Spec) -> None:
    if spec.scheduling == "reuseport":
        for listen in spec.listen:
            if listen.is_unix:
                raise SpecError(
                    f"--listen: {listen.address} is a unix socket, which cannot be shared "
                    "with --scheduling reuseport (use --scheduling shared)"
                )
    if spec.manager == "user" and spec.user:
        raise SpecError("--user: a user's service manager runs workers as that user; drop --user")
    if spec.group and not spec.user:
        raise SpecError("--group: needs --user (without --user, workers get DynamicUser=yes)")
    if spec.watchdog_sec and spec.type != "notify":
        raise SpecError("--watchdog-sec: needs --type notify (the worker sends WATCHDOG=1)")
    seen: set[str] = set()
    for listen in spec.listen:
        if listen.address in seen:
            raise SpecError(f"--listen: {listen.address} is given twice")
        seen.add(listen.address)


# ---- parsers: each takes (key, raw value) and returns the checked value ----


def _text(key: str, raw: Any) -> str:
    if not isinstance(raw, str):
        raise SpecError(f"--{key}: expected a string, got {type(raw).__name__}")
    bad = next((c for c in raw if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise SpecError(f"--{key}: contains a control character ({bad!r}), which units cannot hold")
    return raw


def _parse_name(key: str, raw: Any) -> str:
    name = _text(key, raw)
    if not _UNIT_PREFIX.fullmatch(name):
        raise SpecError(
            f"--{key}: {name!r} is not a valid unit name prefix "
            "(use letters, digits, '_', '.', '-'; not starting with '.' or '-')"
        )
    if len(name) > _UNIT_NAME_MAX:
        raise SpecError(f"--{key}: longer than {_UNIT_NAME_MAX} characters")
    return name


def _parse_exec(key: str, raw: Any) -> tuple[str, ...]:
    if isinstance(raw, list):
        argv = [_text(key, a) for a in raw]
    else:
        text = _text(key, raw)
        try:
            argv = shlex.split(text, posix=True)  # POSIX quoting, no expansion of $ or ~
        except ValueError as e:
            raise SpecError(f"--{key}: cannot split {text!r}: {e}") from None
    if not argv or not argv[0]:
        raise SpecError(f"--{key}: empty command")
    return (_resolve_program(key, argv[0]), *argv[1:])


def _resolve_program(key: str, program: str) -> str:
    # systemd looks bare names up in its own fixed PATH, not the user's (a venv's
    # "python" would silently become /usr/bin/python): resolve them now, as the shell would.
    if program.startswith("/"):
        return program
    if "/" in program:
        return os.path.abspath(program)
    found = shutil.which(program)
    if found is None:
        raise SpecError(f"--{key}: program {program!r} not found on PATH; give its absolute path")
    return os.path.abspath(found)


def _parse_listen(key: str, raw: Any) -> tuple[Listen, ...]:
    items = raw if isinstance(raw, list | tuple) else [raw]
    if not items:
        raise SpecError(f"--{key}: give at least one address")
    return tuple(_parse_one_listen(key, item) for item in items)


def _parse_one_listen(key: str, raw: Any) -> Listen:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    text = _text(key, raw).strip()
    if text.startswith("/"):
        if len(text.encode()) > _SUN_PATH_MAX:
            raise SpecError(f"--{key}: unix socket path longer than {_SUN_PATH_MAX} bytes")
        if any(c.isspace() for c in text):
            raise SpecError(f"--{key}: unix socket path {text!r} contains whitespace")
        return Listen(text, None)
    host, sep, port_text = text.rpartition(":")
    if sep:
        if host.startswith("[") and host.endswith("]"):
            _check_ip(key, host[1:-1], version=6, whole=text)
        else:
            _check_ip(key, host, version=4, whole=text)
    port = _port(key, port_text, whole=text)
    return Listen(f"{host}:{port}" if sep else str(port), port)


def _check_ip(key: str, host: str, version: int, whole: str) -> None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise SpecError(
            f"--{key}: {whole!r}: {host!r} is not an IP address "
            "(use PORT, IPv4:PORT, [IPv6]:PORT or /absolute/unix/path)"
        ) from None
    if ip.version != version:
        raise SpecError(f"--{key}: {whole!r}: write IPv6 addresses in brackets, [::1]:PORT")


def _port(key: str, text: str, whole: str) -> int:
    if not text.isdigit():
        raise SpecError(f"--{key}: {whole!r}: port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise SpecError(f"--{key}: {whole!r}: port {port} is outside 1-65535")
    return port


def _parse_workers(key: str, raw: Any) -> int | None:
    if raw == "auto":
        return None
    if isinstance(raw, bool):
        raise SpecError(f"--{key}: expected 'auto' or a number, got {raw!r}")
    if isinstance(raw, str):
        if not raw.strip().isdigit():
            raise SpecError(f"--{key}: expected 'auto' or a number, got {raw!r}")
        raw = int(raw)
    if not isinstance(raw, int):
        raise SpecError(f"--{key}: expected 'auto' or a number, got {raw!r}")
    if not 1 <= raw <= MAX_WORKERS:
        raise SpecError(f"--{key}: {raw} is outside 1-{MAX_WORKERS}")
    return raw


def _choice(options: tuple[str, ...]):
    def parse(key: str, raw: Any) -> str:
        value = _text(key, raw)
        if value not in options:
            raise SpecError(f"--{key}: {value!r} is not one of {', '.join(options)}")
        return value

    return parse


def _seconds(minimum: float):
    def parse(key: str, raw: Any) -> float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise SpecError(f"--{key}: expected seconds, got {raw!r}") from None
        if not minimum <= value <= 86400 or value != value:
            raise SpecError(f"--{key}: {value:g} is outside {minimum:g}-86400 seconds")
        return value

    return parse


def _parse_bool(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if raw in ("yes", "true", "1"):
        return True
    if raw in ("no", "false", "0"):
        return False
    raise SpecError(f"--{key}: expected true or false, got {raw!r}")


def _parse_user(key: str, raw: Any) -> str:
    value = _text(key, raw)
    if not (_USER_NAME.fullmatch(value) and len(value) <= 31) and not value.isdigit():
        raise SpecError(f"--{key}: {value!r} is not a valid user or group name")
    return value


def _parse_abs_path(key: str, raw: Any) -> str:
    value = _text(key, raw)
    if not value.startswith("/"):
        raise SpecError(f"--{key}: {value!r} must be an absolute path")
    return os.path.normpath(value)


def _parse_env(key: str, raw: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(raw, Mapping):
        pairs = [(k, v) for k, v in raw.items()]
    else:
        items = raw if isinstance(raw, list | tuple) else [raw]
        pairs = []
        for item in items:
            text = _text(key, item)
            k, sep, v = text.partition("=")
            if not sep:
                raise SpecError(f"--{key}: {text!r} is not KEY=VALUE")
            pairs.append((k, v))
    checked: dict[str, str] = {}
    for k, v in pairs:
        k = _text(key, k)
        if not _ENV_KEY.fullmatch(k):
            raise SpecError(f"--{key}: {k!r} is not a valid variable name")
        if k.startswith("CLUSTERKIT_") or k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            raise SpecError(f"--{key}: {k} is set by clusterkit and systemd; choose another name")
        checked[k] = _text(key, str(v) if isinstance(v, int | float) else v)
    return tuple(checked.items())


def _parse_env_file(key: str, raw: Any) -> str:
    # One absolute path, nothing systemd would read differently: no '-' prefix
    # (a missing secrets file must fail the start), no whitespace or backslash.
    value = _parse_abs_path(key, raw)
    if any(c.isspace() or c == "\\" for c in value):
        raise SpecError(f"--{key}: {value!r} contains whitespace or '\\'; use a plainer path")
    return value


def _parse_memory(key: str, raw: Any) -> str:
    value = _text(key, str(raw))
    if not _MEMORY.fullmatch(value):
        raise SpecError(f"--{key}: {value!r} is not a size like 512M, 2G, 50% or infinity")
    return value


def _parse_python(key: str, raw: Any) -> str:
    value = _text(key, raw)
    if not value.startswith("/"):
        raise SpecError(f"--{key}: {value!r} must be an absolute path to a Python with clusterkit")
    return value


#: the keys of [tool.clusterkit], each also a flag of `clusterkit generate`
CONFIG_KEYS: tuple[str, ...] = tuple(_fields())


def parse_env(raw: Any) -> tuple[tuple[str, str], ...]:
    """``--env`` values (a mapping, or KEY=VALUE strings), checked as the spec checks them."""
    return _parse_env("env", raw)
