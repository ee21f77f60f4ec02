"""Cluster names must not shadow units the system already has (dbus, getty, ...).

A cluster NAME writes NAME.socket or NAME@.socket, NAME@.service and
NAME.target into /etc/systemd/system, which take precedence over the vendor's
units of the same name: installing a cluster named ``dbus`` would silently
replace the system bus. Units clusterkit itself wrote are not counted.
"""

from __future__ import annotations

import os
from pathlib import Path

from clusterkit import unitfiles
from clusterkit.manager import user_config_dir, user_runtime_dir

#: systemd.unit(5), "Unit File Load Path": every directory the system manager loads
#: units from (``systemd-analyze unit-paths``), with Debian's /lib besides /usr/lib
SYSTEM_UNIT_DIRS = (
    "/etc/systemd/system.control",
    "/run/systemd/system.control",
    "/run/systemd/transient",
    "/run/systemd/generator.early",
    "/etc/systemd/system",
    "/etc/systemd/system.attached",
    "/run/systemd/system",
    "/run/systemd/system.attached",
    "/run/systemd/generator",
    "/usr/local/lib/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/run/systemd/generator.late",
)
SUFFIXES = (".socket", "@.service", ".target", "@.socket", ".service")


def user_unit_dirs() -> list[Path]:
    """The directories a user's manager loads units from (``systemd-analyze --user
    unit-paths``): the calling user's, as the manager that runs their units sees them."""
    config = user_config_dir()
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    config_dirs = (os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":")
    data_dirs = (os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share").split(":")
    runtime = user_runtime_dir() / "systemd"
    return [
        config / "systemd" / "user.control",
        runtime / "user.control",
        runtime / "transient",
        runtime / "generator.early",
        config / "systemd" / "user",
        *(Path(d) / "systemd" / "user" for d in config_dirs if d),
        Path("/etc/systemd/user"),
        runtime / "user",
        Path("/run/systemd/user"),
        runtime / "generator",
        data / "systemd" / "user",
        *(Path(d) / "systemd" / "user" for d in data_dirs if d),
        Path("/usr/local/lib/systemd/user"),
        Path("/usr/lib/systemd/user"),
        runtime / "generator.late",
    ]


def shadowed_unit(name: str, *, user: bool = False, root: Path = Path("/")) -> Path | None:
    """An existing unit, not written by clusterkit, that cluster ``name`` would shadow
    (or be shadowed by); *root* is the tree the system manager sees (a container's)."""
    dirs = user_unit_dirs() if user else [root / d.lstrip("/") for d in SYSTEM_UNIT_DIRS]
    for directory in dirs:
        for suffix in SUFFIXES:
            path = directory / f"{name}{suffix}"
            if unitfiles.state(path) == "foreign":
                return path
    return None


def refusal(name: str, *, user: bool = False, root: Path = Path("/")) -> str | None:
    """The one-line error for a name that shadows a unit, or None."""
    path = shadowed_unit(name, user=user, root=root)
    if path is None:
        return None
    return (
        f"--name: {name!r} would shadow the existing unit {path}; "
        "choose a name no installed unit uses"
    )
