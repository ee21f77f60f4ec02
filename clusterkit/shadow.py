"""Cluster names must not shadow units the system already has (dbus, getty, ...).

A cluster NAME writes NAME.socket or NAME@.socket, NAME@.service and
NAME.target into /etc/systemd/system, which take precedence over the vendor's
units of the same name: installing a cluster named ``dbus`` would silently
replace the system bus. Units clusterkit itself wrote are not counted.
"""

from __future__ import annotations

from pathlib import Path

from clusterkit import unitfiles

SYSTEM_UNIT_DIRS = (
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
    "/etc/systemd/system",
    "/run/systemd/system",
)
USER_UNIT_DIRS = ("/usr/lib/systemd/user", "/etc/systemd/user", "/run/systemd/user")
SUFFIXES = (".socket", "@.service", ".target", "@.socket", ".service")


def shadowed_unit(name: str, *, user: bool = False) -> Path | None:
    """An existing unit, not written by clusterkit, that cluster ``name`` would shadow."""
    dirs = SYSTEM_UNIT_DIRS + (USER_UNIT_DIRS if user else ())
    for directory in dirs:
        for suffix in SUFFIXES:
            path = Path(directory) / f"{name}{suffix}"
            if unitfiles.state(path) == "foreign":
                return path
    return None


def refusal(name: str, *, user: bool = False) -> str | None:
    """The one-line error for a name that shadows a unit, or None."""
    path = shadowed_unit(name, user=user)
    if path is None:
        return None
    return (
        f"--name: {name!r} would shadow the existing unit {path}; "
        "choose a name no installed unit uses"
    )
