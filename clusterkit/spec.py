"""The cluster spec: the one place that checks input.

CLI flags and ``[tool.clusterkit]`` in a ``pyproject.toml`` are merged here
(flags win) into one frozen :class:`Spec`. Everything downstream (templates,
unit files, install) trusts it. Every error is a :class:`SpecError` whose
message names the field, so the CLI can print it on one line and exit 2.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import shlex
import shutil
import stat
import tomllib
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterkit.names import BACK_OFF_SUFFIX

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
# Numbers are plain ASCII digits: str.isdigit(), int() and float() also take
# "²" or "٣", which would reach systemd as something else or crash.
_ASCII_INT = re.compile(r"[0-9]+")
_ASCII_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_NUMERIC_ID = re.compile(r"[1-9][0-9]*")  # systemd refuses "00" and other leading zeros
_MEMORY = re.compile(r"([0-9]+)([KMGT]?)|([0-9]{1,2}|100)%|infinity")
_MEMORY_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# Characters that end a line for systemd ("\n", "\r") or for Python's
# str.splitlines(), which anything that re-reads a unit may use.
_LINE_ENDS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
# Control, format, separator, surrogate, private-use and unassigned characters:
# invisible or line-ending, never needed in a unit.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
_CATEGORY_NAMES = {"Cs": "a surrogate", "Co": "a private-use character", "Cn": "unassigned"}
_MAX_ID = 4294967294  # (uid_t)-1 is invalid
_UID_16_INVALID = 65535  # (uint16_t)-1, refused by systemd too
_PATH_MAX = 4095
_NAME_MAX = 255
_UNIT_NAME_MAX = 255 - len(f"{BACK_OFF_SUFFIX}@1024.service")  # the longest unit of a cluster
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

    @property
    def host(self) -> str:
        """A TCP address's host, without brackets: "" for a bare port (every address)."""
        return self.address.rpartition(":")[0].strip("[]")


@dataclass(frozen=True)
class Spec:
    name: str
    exec: tuple[str, ...]
    listen: tuple[Listen, ...] = (Listen("3000", 3000),)
    workers: int | None = None  # None means "auto": one per CPU of the host that runs the units
    scheduling: str = "shared"
    run_as: str | None = None  # None: DynamicUser=yes
    group: str | None = None
    working_directory: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    env_file: str | None = None  # EnvironmentFile= for secrets: root-owned, mode 0600
    restart: str = "always"
    restart_sec: float = 0.0  # at once; templates/service.j2 backs off a crash loop
    drain_timeout: float = 30.0  # a stopping worker finishes in-flight requests
    watchdog_sec: float = 0.0  # 0: no watchdog
    cpu_affinity: bool = False
    memory_max: str | None = None
    tasks_max: str = "512"  # TasksMax= per worker, or "infinity" (why: its Option's help)
    type: str = "notify"
    hardening: str = "default"
    manager: str = "system"  # the systemd instance the units are for
    description: str | None = None
    state_directory: str | None = None  # StateDirectory=: /var/lib/NAME, kept, writable
    cache_directory: str | None = None  # CacheDirectory=: /var/cache/NAME
    runtime_directory: str | None = None  # RuntimeDirectory=: /run/NAME, gone when stopped

    @property
    def worker_ids(self) -> range | None:
        return None if self.workers is None else range(self.workers)


@dataclass(frozen=True)
class Option:
    """One setting: a flag of ``generate``/``up``, a key of [tool.clusterkit], a Spec field.

    The flags, the config keys, the README's option table and the defaults it
    shows all come from :data:`OPTIONS`; the defaults themselves are the Spec's.
    """

    key: str  # the flag without "--", and the [tool.clusterkit] key
    attr: str  # the Spec field
    parse: Callable[[str, Any], Any]  # (key, raw value) -> checked value, or SpecError
    help: str
    metavar: str | None = None
    repeatable: bool = False  # a flag given many times; a list in the config
    switch: bool = False  # a flag without a value; true/false in the config
    default: str | None = None  # the default in words, where the Spec's value says too little
    old_keys: tuple[str, ...] = ()  # deprecated spellings, still accepted for one release

    def default_text(self) -> str:
        if self.default is not None:
            return self.default
        value = Spec.__dataclass_fields__[self.attr].default
        if value is None or value is False or value == 0.0:
            return ""
        if isinstance(value, tuple):
            return ", ".join(getattr(v, "address", str(v)) for v in value)
        return f"{value:g}" if isinstance(value, float) else str(value)


def _options() -> tuple[Option, ...]:
    return (
        Option(
            "name",
            "name",
            _parse_name,
            "cluster name: units NAME.socket, NAME@.service, NAME.target",
            default="required",
        ),
        Option(
            "exec",
            "exec",
            _parse_exec,
            "worker command, split like a POSIX shell without "
            "expansion: the worker gets exactly this argv; a bare program name is resolved "
            "on your PATH now",
            metavar="CMD",
            default="required",
        ),
        Option(
            "listen",
            "listen",
            _parse_listen,
            "PORT, IPv4:PORT, [IPv6]:PORT or /absolute/unix/path; repeatable",
            metavar="ADDRESS",
            repeatable=True,
        ),
        Option(
            "workers",
            "workers",
            _parse_workers,
            "worker count: a number (1-1024), or auto "
            "for one per CPU of the host that runs the units",
            metavar="auto|N",
            default="auto",
        ),
        Option(
            "scheduling",
            "scheduling",
            _choice(SCHEDULING_MODES),
            "shared: one socket every "
            "worker accepts on; reuseport: one SO_REUSEPORT socket per worker",
            metavar="|".join(SCHEDULING_MODES),
        ),
        Option(
            "run-as",
            "run_as",
            _parse_user,
            "run the workers as this (unprivileged) user",
            metavar="USER",
            default="DynamicUser=yes",
            old_keys=("user",),
        ),
        Option(
            "group",
            "group",
            _parse_user,
            "run the workers with this group (needs --run-as)",
            metavar="GROUP",
        ),
        Option(
            "working-directory",
            "working_directory",
            _parse_abs_path,
            "WorkingDirectory= of the workers",
            metavar="DIR",
            default="/",
        ),
        Option(
            "env",
            "env",
            _parse_env,
            "environment variable for the workers; repeatable (a "
            "table in pyproject.toml); world-readable: it sits in the unit file and in "
            "systemctl show, so never put secrets here",
            metavar="KEY=VALUE",
            repeatable=True,
        ),
        Option(
            "env-file",
            "env_file",
            _parse_env_file,
            "EnvironmentFile= for secrets: an "
            "absolute path to a root-owned file of mode 0600 (or 0400); generate warns "
            "when it is not, install refuses",
            metavar="PATH",
        ),
        Option(
            "state-directory",
            "state_directory",
            _parse_unit_directory,
            "StateDirectory=: "
            "/var/lib/DIR, kept across restarts and writable by the workers (a database, "
            "uploads); DIR is the cluster's name or `NAME/SUBDIR`",
            metavar="DIR",
        ),
        Option(
            "cache-directory",
            "cache_directory",
            _parse_unit_directory,
            "CacheDirectory=: /var/cache/DIR, writable by the workers; DIR as above",
            metavar="DIR",
        ),
        Option(
            "runtime-directory",
            "runtime_directory",
            _parse_unit_directory,
            "RuntimeDirectory=: /run/DIR, writable by the workers, removed when they stop; "
            "DIR as above",
            metavar="DIR",
        ),
        Option(
            "restart", "restart", _choice(RESTART_POLICIES), "Restart= policy", metavar="POLICY"
        ),
        Option(
            "restart-sec",
            "restart_sec",
            _seconds(minimum=0.0),
            "RestartSec=: the pause before a worker restarts",
            metavar="SECONDS",
            default="0: at once; a crash loop backs off to 1, 2, then 4 s",
        ),
        Option(
            "drain-timeout",
            "drain_timeout",
            _seconds(minimum=0.1),
            "seconds a stopping "
            "worker has to finish in-flight requests (it then has 5 s more to exit)",
            metavar="SECONDS",
            old_keys=("stop-timeout",),
        ),
        Option(
            "watchdog-sec",
            "watchdog_sec",
            _seconds(minimum=0.0),
            "WatchdogSec=: a worker whose event loop stops pinging is killed and restarted",
            metavar="SECONDS",
            default="off",
        ),
        Option(
            "cpu-affinity",
            "cpu_affinity",
            _parse_bool,
            "pin worker K to CPU K (CPUAffinity=%i)",
            switch=True,
            default="off",
        ),
        Option(
            "memory-max",
            "memory_max",
            _parse_memory,
            "MemoryMax= per worker, e.g. 512M",
            metavar="SIZE",
        ),
        Option(
            "tasks-max",
            "tasks_max",
            _parse_tasks_max,
            "TasksMax=: processes and threads per worker, or infinity (systemd's default, 15% of "
            "the host's, would let 7 workers of an app gone hostile take every pid there)",
            metavar="N",
        ),
        Option(
            "type",
            "type",
            _choice(SERVICE_TYPES),
            "service Type=: notify (the worker "
            "sends READY=1); exec or simple for servers that never do",
            metavar="|".join(SERVICE_TYPES),
        ),
        Option(
            "hardening",
            "hardening",
            _choice(HARDENING_LEVELS),
            "sandbox level",
            metavar="|".join(HARDENING_LEVELS),
        ),
        Option(
            "manager",
            "manager",
            _choice(MANAGERS),
            "the service manager the units are for: system, or user for a user's service manager",
            metavar="|".join(MANAGERS),
        ),
        Option(
            "description",
            "description",
            _bare,
            "Description= of the units",
            default="clusterkit cluster NAME",
        ),
    )


def build_spec(config: Mapping[str, Any], flags: Mapping[str, Any]) -> Spec:
    """Merge config-file values and flags (flags win; None means not given) into a Spec."""
    config = canonical_keys(config)
    known = {o.key for o in OPTIONS}
    unknown = sorted(set(config) - known)
    if unknown:
        raise SpecError(
            f"[tool.clusterkit]: unknown key {unknown[0]!r} (known: {', '.join(CONFIG_KEYS)})"
        )
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = flags.get(option.key)
        if raw is None:
            raw = config.get(option.key)
        if raw is None:
            continue
        values[option.attr] = option.parse(option.key, raw)
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


def canonical_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with deprecated keys under their new names (the new name wins)."""
    renamed = dict(config)
    for option in OPTIONS:
        for old in option.old_keys:
            if old in renamed:
                value = renamed.pop(old)
                renamed.setdefault(option.key, value)
    return renamed


def deprecations(keys: Iterable[str]) -> list[str]:
    """One warning per deprecated key or flag among ``keys``."""
    new_name = {old: o.key for o in OPTIONS for old in o.old_keys}
    return [
        f"{key} is deprecated and will be removed; it is now {new_name[key]}"
        for key in keys
        if key in new_name
    ]


#: the most of a config file read: a pyproject.toml is a few KiB
CONFIG_MAX_BYTES = 1 << 20


def read_config(path: Path) -> bytes:
    """The bytes of a config file: a regular file (a FIFO would block, a device never
    end) of at most CONFIG_MAX_BYTES, read once (parse these bytes, never the path again)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise SpecError(f"--config: cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError(f"--config: {path} is not a regular file")
        raw = f.read(CONFIG_MAX_BYTES + 1)
    if len(raw) > CONFIG_MAX_BYTES:
        raise SpecError(f"--config: {path} is larger than {CONFIG_MAX_BYTES >> 20} MiB")
    return raw


def parse_config(raw: bytes, path: Path) -> dict[str, Any]:
    """The whole TOML document of a config file's bytes (see :func:`read_config`)."""
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"--config: {path} is not valid TOML: {e}") from None
    except RecursionError:  # arrays nested thousands deep
        raise SpecError(f"--config: {path} nests its values too deeply") from None


def clusterkit_table(document: dict[str, Any], path: Path) -> dict[str, Any]:
    """The [tool.clusterkit] table of a parsed pyproject.toml ({} when it has none)."""
    tool = document.get("tool", {})
    table = tool.get("clusterkit", {}) if isinstance(tool, dict) else {}
    if not isinstance(table, dict):
        raise SpecError(f"--config: [tool.clusterkit] in {path} must be a table")
    # [tool.clusterkit.fleet] is the fleet's table, checked by clusterkit.fleetspec
    return {k: v for k, v in table.items() if k != "fleet"}


def load_config(path: Path) -> dict[str, Any]:
    """The [tool.clusterkit] table of a pyproject.toml ({} when the file has none)."""
    return clusterkit_table(parse_config(read_config(path), path), path)


#: the directories a spec can give the workers: its field, where the system manager makes it
UNIT_DIRECTORIES = (
    ("state_directory", "/var/lib"),
    ("cache_directory", "/var/cache"),
    ("runtime_directory", "/run"),
)


def _check_combination(spec: Spec) -> None:
    for field, _top in UNIT_DIRECTORIES:
        value = getattr(spec, field)
        # systemd hands the directory to the workers (chown, and a move into private/ with
        # DynamicUser=yes): any other name could be another program's, root's own
        if value and value != spec.name and not value.startswith(f"{spec.name}/"):
            raise SpecError(
                f"--{field.replace('_', '-')}: {value!r} is not the cluster's own: use "
                f"{spec.name!r} or {spec.name}/SUBDIR (systemd gives the workers that "
                "directory, whoever has it)"
            )
    if sum(map(len, spec.exec)) > EXEC_MAX_CHARS:
        raise SpecError(f"--exec: the command line is longer than {EXEC_MAX_CHARS} characters")
    if spec.scheduling == "reuseport":
        for listen in spec.listen:
            if listen.is_unix:
                raise SpecError(
                    f"--listen: {listen.address} is a unix socket, which cannot be shared "
                    "with --scheduling reuseport (use --scheduling shared)"
                )
    if spec.manager == "user" and spec.run_as:
        raise SpecError(
            "--run-as: a user's service manager runs workers as that user; drop --run-as"
        )
    if spec.group and not spec.run_as:
        raise SpecError("--group: needs --run-as (without it, workers get DynamicUser=yes)")
    if spec.watchdog_sec and spec.type != "notify":
        raise SpecError("--watchdog-sec: needs --type notify (the worker sends WATCHDOG=1)")
    seen: set[str] = set()
    for listen in spec.listen:
        if listen.address in seen:
            raise SpecError(f"--listen: {listen.address} is given twice")
        seen.add(listen.address)


# ---- parsers: each takes (key, raw value) and returns the checked value ----


#: the longest value: systemd reads a unit line of at most 1 MiB, and quoting can double one
VALUE_MAX_CHARS = 64 * 1024
EXEC_MAX_CHARS = 128 * 1024  # the command line's arguments together: one ExecStart= line


def _text(key: str, raw: Any) -> str:
    """A string with no character that could end a line or hide in a unit."""
    if not isinstance(raw, str):
        raise SpecError(f"--{key}: expected a string, got {type(raw).__name__}")
    if len(raw) > VALUE_MAX_CHARS:
        raise SpecError(f"--{key}: {len(raw)} characters, more than {VALUE_MAX_CHARS}")
    bad = next((c for c in raw if unicodedata.category(c) in _FORBIDDEN_CATEGORIES), None)
    if bad is not None:
        raise SpecError(f"--{key}: contains {_describe_char(bad)}")
    return raw


def _describe_char(char: str) -> str:
    name = unicodedata.name(char, "")
    label = f"U+{ord(char):04X}" + (f" {name}" if name else "")
    if char in _LINE_ENDS:
        return f"{label}, which ends a line in unit files"
    kind = _CATEGORY_NAMES.get(unicodedata.category(char), "a control or format character")
    return f"{label}, {kind}, which units must not hold"


def _bare(key: str, raw: Any) -> str:
    """Text written unquoted after "Key=": systemd strips spaces around it and
    continues the line after a trailing backslash, so neither may be there."""
    value = _text(key, raw)
    if value[:1] == " " or value[-1:] == " ":
        raise SpecError(f"--{key}: {value!r} starts or ends with a space, which systemd drops")
    if value.endswith("\\"):
        raise SpecError(
            f"--{key}: {value!r} ends with a backslash, which continues the line in unit files"
        )
    return value


def _ascii(key: str, raw: Any, pattern: re.Pattern[str], expected: str) -> str:
    """Number text in ASCII digits only (never str.isdigit(), int() or float() on raw text)."""
    text = _text(key, raw).strip()
    if not pattern.fullmatch(text):
        raise SpecError(f"--{key}: expected {expected} in ASCII digits, got {text!r}")
    return text


def _parse_name(key: str, raw: Any) -> str:
    name = _text(key, raw)
    if not _UNIT_PREFIX.fullmatch(name):
        raise SpecError(
            f"--{key}: {name!r} is not a valid unit name prefix "
            "(use letters, digits, '_', '.', '-'; not starting with '.' or '-')"
        )
    if len(name) > _UNIT_NAME_MAX:
        raise SpecError(f"--{key}: longer than {_UNIT_NAME_MAX} characters")
    if name.endswith(BACK_OFF_SUFFIX):  # NAME-backoff@.service is cluster NAME's back-off
        raise SpecError(
            f"--{key}: {name!r} ends in {BACK_OFF_SUFFIX!r}, which names clusterkit's back-off "
            f"units (of a cluster {name.removesuffix(BACK_OFF_SUFFIX)!r}); choose another name"
        )
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
    return (_program_path(key, _resolve_program(key, argv[0])), *argv[1:])


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


def _program_path(key: str, path: str) -> str:
    """An absolute program path, which the unit's start shell executes (``exec "$@"``) and
    passes as argv[0] unchanged: an argument of ``ExecStart=``, quoted like the others."""
    if path.endswith("/") or ".." in path.split("/"):
        raise SpecError(f"--{key}: program path {path!r} must name a file, without '..'")
    return _check_path_length(key, path)


def _check_path_length(key: str, path: str) -> str:
    if len(path.encode()) > _PATH_MAX or any(len(p.encode()) > _NAME_MAX for p in path.split("/")):
        raise SpecError(f"--{key}: path longer than {_PATH_MAX} bytes or {_NAME_MAX} per name")
    return path


def _parse_listen(key: str, raw: Any) -> tuple[Listen, ...]:
    items = raw if isinstance(raw, list | tuple) else [raw]
    if not items:
        raise SpecError(f"--{key}: give at least one address")
    return tuple(_parse_one_listen(key, item) for item in items)


def _parse_one_listen(key: str, raw: Any) -> Listen:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    text = _text(key, raw)
    if text.startswith("/"):
        text = _bare(key, text)  # a path as given: no space stripped off its end
        if len(text.encode()) > _SUN_PATH_MAX:
            raise SpecError(f"--{key}: unix socket path longer than {_SUN_PATH_MAX} bytes")
        if any(c.isspace() for c in text):
            raise SpecError(f"--{key}: unix socket path {text!r} contains whitespace")
        return Listen(text, None)
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if sep:
        if host.startswith("[") and host.endswith("]"):
            _check_ip(key, host[1:-1], version=6, whole=text)
        else:
            _check_ip(key, host, version=4, whole=text)
    port = _port(key, port_text, whole=text)
    return Listen(f"{host}:{port}" if sep else str(port), port)


def _check_ip(key: str, host: str, version: int, whole: str) -> None:
    if "%" in host:
        # systemd 252's ListenStream= refuses every "[addr%zone]" ("Failed to
        # parse address value"): the socket would silently not exist.
        raise SpecError(
            f"--{key}: {whole!r}: IPv6 zone ids are not supported by ListenStream=; "
            "give the address without %zone"
        )
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
    if not _ASCII_INT.fullmatch(text):
        raise SpecError(f"--{key}: {whole!r}: port {text!r} is not a number in ASCII digits")
    port = int(text)
    if not 1 <= port <= 65535:
        raise SpecError(f"--{key}: {whole!r}: port {port} is outside 1-65535")
    return port


def _count_or(word: str, highest: int) -> Callable[[str, Any], int | str]:
    """A parser of a count from 1 to *highest*, or *word* (returned as it is)."""

    def parse(key: str, raw: Any) -> int | str:
        if raw == word:
            return word
        if isinstance(raw, str):
            raw = int(_ascii(key, raw, _ASCII_INT, f"{word!r} or a number"))
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise SpecError(f"--{key}: expected {word!r} or a number, got {raw!r}")
        if not 1 <= raw <= highest:
            raise SpecError(f"--{key}: {raw} is outside 1-{highest}")
        return raw

    return parse


def _parse_workers(key: str, raw: Any) -> int | None:
    count = _count_or("auto", MAX_WORKERS)(key, raw)
    return None if count == "auto" else int(count)


#: the most pids a Linux host has (PID_MAX_LIMIT): a larger TasksMax= bounds nothing
_MOST_TASKS = 4194304


def _parse_tasks_max(key: str, raw: Any) -> str:
    return str(_count_or("infinity", _MOST_TASKS)(key, raw))


def _choice(options: tuple[str, ...]):
    def parse(key: str, raw: Any) -> str:
        value = _text(key, raw)
        if value not in options:
            raise SpecError(f"--{key}: {value!r} is not one of {', '.join(options)}")
        return value

    return parse


def _seconds(minimum: float):
    def parse(key: str, raw: Any) -> float:
        if isinstance(raw, str):
            raw = float(_ascii(key, raw, _ASCII_DECIMAL, "seconds"))
        if not isinstance(raw, int | float) or isinstance(raw, bool):
            raise SpecError(f"--{key}: expected seconds, got {raw!r}")
        value = float(raw)
        if not minimum <= value <= 86400:  # also false for NaN
            raise SpecError(f"--{key}: {value:g} is outside {minimum:g}-86400 seconds")
        if 0 < value < 0.001:
            # Units count in milliseconds here: this would render as 0ms, which
            # for WatchdogSec= means "off".
            raise SpecError(f"--{key}: {value:g} is under 1 ms; give 0 or at least 0.001")
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
    """A user (or group) name or numeric id, never root: see _refuse_root."""
    value = _text(key, raw)
    if _NUMERIC_ID.fullmatch(value) or value == "0":
        number = int(value)
        if number > _MAX_ID or number == _UID_16_INVALID:
            raise SpecError(f"--{key}: {value} is not a valid numeric id")
    elif not (_USER_NAME.fullmatch(value) and len(value) <= 31):
        raise SpecError(
            f"--{key}: {value!r} is not a valid user or group name "
            "(numeric ids in ASCII digits, without leading zeros)"
        )
    _refuse_root(key, value)
    return value


def _refuse_root(key: str, value: str) -> None:
    # A worker running as root can write journal records no event reader can
    # tell from clusterkit's, and nothing the sandbox keeps from it matters.
    lookup = grp.getgrnam if key == "group" else pwd.getpwnam
    try:
        resolved = value if value.isascii() and value.isdigit() else str(lookup(value)[2])
    except KeyError:
        resolved = value  # not known on this host: judged by its name alone
    if value == "root" or resolved == "0":
        raise SpecError(
            f"--{key}: {value!r} is root (id 0); workers never run as root (a root worker can "
            "forge exit events and defeats the sandbox): name an unprivileged one"
        )
    if value in ("nobody", "nogroup") or resolved == "65534":
        raise SpecError(
            f"--{key}: {value!r} is the overflow id (65534), which other services share (a "
            "worker could signal them, and they it; systemd-analyze calls it not safe): "
            "name one of the app's own, or leave --run-as out for a dynamic user"
        )


def _parse_abs_path(key: str, raw: Any) -> str:
    value = _text(key, raw)
    if not value.startswith("/"):
        raise SpecError(f"--{key}: {value!r} must be an absolute path")
    # normpath keeps a leading "//" (POSIX allows it); systemd folds it to "/".
    # Checked once normalized: "/srv/a\\/" becomes "/srv/a\\", which ends the line.
    return _check_path_length(key, _bare(key, "/" + os.path.normpath(value).lstrip("/")))


def _parse_env(key: str, raw: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(raw, Mapping):
        pairs = [(k, _env_value(key, k, v)) for k, v in raw.items()]
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
        checked[k] = _text(key, v)
    return tuple(checked.items())


def _parse_env_file(key: str, raw: Any) -> str:
    # One absolute path, nothing systemd would read differently: no '-' prefix
    # (a missing secrets file must fail the start), no whitespace or backslash.
    value = _parse_abs_path(key, raw)
    if any(c.isspace() or c == "\\" for c in value):
        raise SpecError(f"--{key}: {value!r} contains whitespace or '\\'; use a plainer path")
    return value


_UNIT_DIRECTORY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


def _parse_unit_directory(key: str, raw: Any) -> str:
    # StateDirectory= and friends: a path relative to /var/lib, /var/cache or /run.
    value = _text(key, raw)
    if not _UNIT_DIRECTORY.fullmatch(value) or ".." in value.split("/"):
        raise SpecError(
            f"--{key}: {value!r} must be a relative directory name such as myapp "
            "(letters, digits, '_', '.', '-', '/'; no '..')"
        )
    if value.split("/")[0] == "clusterkit":  # /run/clusterkit: the back-off's, root's alone
        raise SpecError(f"--{key}: {value!r} is clusterkit's own directory; choose another")
    return value


def _env_value(key: str, name: Any, value: Any) -> str:
    """A value from a [tool.clusterkit] env table: a string, or an integer as its digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        # TOML true would otherwise become "True", 1.0 "1.0": say what the app gets.
        raise SpecError(
            f"--{key}: {name} = {value!r} is a {type(value).__name__}; quote it "
            '(e.g. "true") so the worker gets exactly that text'
        )
    return value


def _parse_memory(key: str, raw: Any) -> str:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    value = _text(key, raw)
    match = _MEMORY.fullmatch(value)
    if not match:
        raise SpecError(f"--{key}: {value!r} is not a size like 512M, 2G, 50% or infinity")
    number = match.group(1) or match.group(3)
    if number is not None and int(number) == 0:
        # systemd ignores MemoryMax=0 ("out of range"): the limit would silently be off.
        raise SpecError(f"--{key}: {value!r} is zero, which systemd ignores (no limit)")
    if match.group(1) and int(number) * _MEMORY_UNITS[match.group(2)] >= 2**64 - 1:
        raise SpecError(f"--{key}: {value!r} is larger than systemd can hold")
    return value


#: the keys of [tool.clusterkit], each also a flag of `clusterkit generate`
OPTIONS: tuple[Option, ...] = _options()
CONFIG_KEYS: tuple[str, ...] = tuple(o.key for o in OPTIONS)


def options_table() -> str:
    """The README's option table (Markdown), from :data:`OPTIONS`."""
    rows = ["| option | meaning | default |", "|---|---|---|"]
    for o in OPTIONS:
        flag = f"`--{o.key}{' ' + o.metavar if o.metavar else ''}`"
        cells = (flag, o.help, o.default_text())
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def check_name(name: Any) -> str:
    """A cluster name, checked as ``--name`` is."""
    return _parse_name("name", name)


def check_worker_count(count: int, *, minimum: int = 1) -> int:
    """A number of workers within what clusterkit supports."""
    if not minimum <= count <= MAX_WORKERS:
        raise SpecError(f"N: {count} is outside {minimum}-{MAX_WORKERS}")
    return count


def batch_size(batch: int | str, workers: int) -> int:
    """How many of ``workers`` a reload restarts at once: a count, or a percentage ("25%")."""
    text = str(batch).strip()
    if text.endswith("%") and _ASCII_INT.fullmatch(text[:-1]) and 1 <= int(text[:-1]) <= 100:
        return max(1, -(-workers * int(text[:-1]) // 100))
    if _ASCII_INT.fullmatch(text) and 1 <= int(text) <= MAX_WORKERS:
        return int(text)
    raise SpecError(f"--batch: {text!r} is not a count (1-{MAX_WORKERS}) or a percentage (1%-100%)")


def parse_env(raw: Any) -> tuple[tuple[str, str], ...]:
    """``--env`` values (a mapping, or KEY=VALUE strings), checked as the spec checks them."""
    return _parse_env("env", raw)
