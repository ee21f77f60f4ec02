"""Which journal to read, how its fields are converted, and how a manager's own records look.

Exit events (:mod:`clusterkit.events`), the workers' log lines (:mod:`clusterkit.logs`)
and the fleet's collected journals (:mod:`clusterkit.fleet`) open their readers here, so
they read the same fields the same way. A journal is the local one, the one of the
container ``clusterkit up`` runs (:attr:`Manager.journal_directory`), a directory of
journals collected from other hosts, or a given list of files (one sender's, on a collector).

Records a service manager writes about a unit are trusted by fields no other process
can set: ``_PID=1`` for the system manager; for a user's manager, a sender in the user's
``init.scope`` with the user's ``_UID``.

journald's rate limit (per unit: PID 1 counts as ``init.scope``) can drop those records
when something makes the manager log a lot (a worker's child flooding ``$NOTIFY_SOCKET``,
which PID 1 refuses with one warning each). journald then writes "Suppressed N messages
from init.scope" (:data:`DROPPED`) with ``_TRANSPORT=driver``, which only journald's own
records carry: no client can set a ``_`` field, and a driver record holds no client field.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from systemd import journal

from clusterkit.manager import Manager


def _int_or_none(raw: bytes) -> int | None:
    text = raw.decode()
    return int(text) if text.lstrip("-").isdigit() else None


def _utc(usec: int) -> datetime:
    return datetime.fromtimestamp(usec / 1_000_000, UTC)


#: Every field we read, converted the same way whatever systemd-python's defaults do
#: (they turn ``EXIT_STATUS``-like fields into ints and leave what fails as bytes).
CONVERTERS: dict[str, Callable[[bytes], object]] = {
    "MESSAGE_ID": bytes.decode,
    "EXIT_STATUS": bytes.decode,
    "_PID": _int_or_none,
    "_UID": _int_or_none,
    "N_DROPPED": _int_or_none,
    "__REALTIME_TIMESTAMP": _utc,
}


#: journald's "Suppressed N messages from UNIT" (SD_MESSAGE_JOURNAL_DROPPED)
DROPPED = "a596d6fe7bfa4994828e72309e95d61e"


def open_reader(
    manager: Manager | None = None,
    *,
    directory: str | None = None,
    files: Sequence[str] | None = None,
) -> journal.Reader:
    """A reader on ``files``, else ``directory``, else ``manager``'s journal (default: local)."""
    if files is not None:
        return journal.Reader(files=list(files), converters=CONVERTERS)
    directory = directory or (manager.journal_directory if manager else None)
    if directory:
        return journal.Reader(path=directory, converters=CONVERTERS)
    return journal.Reader(converters=CONVERTERS)


def seek_after(reader: journal.Reader, cursor: str) -> None:
    """Position ``reader`` just after the record at ``cursor`` (resume a read). seek_cursor
    lands *on* the record: step onto it, and skip it only if it is still there."""
    reader.seek_cursor(cursor)
    reader.get_next()
    if not reader.test_cursor(cursor):
        reader.seek_cursor(cursor)


@dataclass(frozen=True)
class ManagerFields:
    """The journal fields a service manager's records about a unit use."""

    unit: str  # the unit a record is about
    invocation: str  # that unit's run
    writer: tuple[str, object]  # the trusted field and value of the manager itself
    sender_unit: str  # the trusted unit of a record's sender
    uid: int = 0  # the manager's user (every user's manager has an init.scope)
    rate_limited_as: str = "init.scope"  # the unit journald counts the manager's records to

    def wrote(self, entry: dict[str, object]) -> bool:
        """Written by the service manager itself: trusted fields only a manager has."""
        field_name, value = self.writer
        return entry.get(field_name) == value and entry.get("_UID") == self.uid

    def match_writer(self) -> str:
        field_name, value = self.writer
        return f"{field_name}={value}"

    def match_dropped(self) -> list[str]:
        """The matches for journald's records of the manager's records it dropped."""
        return [f"MESSAGE_ID={DROPPED}", "_TRANSPORT=driver"]

    def dropped(self, entry: dict[str, object]) -> int | None:
        """How many of the manager's records journald says it dropped, if ``entry`` is
        journald's own record of that; else None."""
        count = entry.get("N_DROPPED")
        if (
            entry.get("MESSAGE_ID") == DROPPED
            and entry.get("_TRANSPORT") == "driver"
            and entry.get("_UID") == 0
            and entry.get("OBJECT_SYSTEMD_UNIT") == self.rate_limited_as
            and isinstance(count, int)
        ):
            return count
        return None

    def match_user_lines(self, unit: str) -> list[str] | None:
        """Under a user's manager, the matches for lines that unit's processes wrote,
        found by sender user and identifier (``SyslogIdentifier=%N``) instead of unit.

        The fallback for a short-lived sender (the units' ``echo``) that exited before
        journald read its cgroup: journald then records no unit at all, since a user's
        manager, unlike the system's, does not name the unit to journald. Every unit
        there runs as that user, so that user's records are as trusted as its units'.
        None under the system manager: there the unit is known whatever the sender.
        """
        if self.uid == 0:
            return None
        return [f"_UID={self.uid}", f"SYSLOG_IDENTIFIER={unit.removesuffix('.service')}"]


SYSTEM = ManagerFields("UNIT", "INVOCATION_ID", ("_PID", 1), "_SYSTEMD_UNIT")
_USER = ManagerFields(
    "USER_UNIT", "USER_INVOCATION_ID", ("_SYSTEMD_USER_UNIT", "init.scope"), "_SYSTEMD_USER_UNIT"
)


def manager_fields(manager: Manager) -> ManagerFields:
    """The fields of ``manager``'s own records: the system's, or this user's."""
    if not manager.user:
        return SYSTEM
    uid = os.getuid()  # journald counts the user's manager to its system unit
    return replace(_USER, uid=uid, rate_limited_as=f"user@{uid}.service")


def manager_lines(manager: Manager, unit: str, count: int = 3) -> list[str]:
    """The last ``count`` messages ``manager`` itself wrote about ``unit`` (a socket's
    bind error, say), oldest first."""
    fields = manager_fields(manager)
    reader = open_reader(manager)
    try:
        reader.add_match(f"{fields.unit}={unit}", fields.match_writer())
        reader.seek_tail()
        lines: list[str] = []
        while len(lines) < count and (entry := reader.get_previous()):
            message = entry.get("MESSAGE")
            if fields.wrote(entry) and isinstance(message, str):
                lines.append(message)
        return lines[::-1]
    finally:
        reader.close()
