"""Node's cluster events, read from the journal.

Each event comes from one journal record, trusted only when its *trusted*
fields (set by journald from the sender's credentials, never by the sender)
show who wrote it:

- ``fork``: "Starting NAME@K.service" (``MESSAGE_ID=7d4958e8…``), by systemd (``_PID=1``);
- ``online``, ``listening``: "Started NAME@K.service" (``39f53479…``), by systemd;
  with ``Type=notify`` that is the worker's ``READY=1``;
- ``disconnect``: "Stopping NAME@K.service" (``de5b426a…``), by systemd: a
  requested stop began (Node also emits it on a crash; clusterkit does not);
- ``exit``: clusterkit's reporter (:mod:`clusterkit.report`, ``ce590ac1…``),
  ``_UID=0`` and ``_SYSTEMD_UNIT=NAME@K.service`` (it runs in the worker's cgroup).

A sandboxed worker (``DynamicUser=``) can write records that *say* anything,
but not with ``_UID=0`` or ``_PID=1``. Under a user's manager the workers run
as the same user, so the reporter's records are told apart only by
``_SYSTEMD_USER_UNIT`` (a worker could forge its own exit record there).

Readers read in journal order and can resume from a cursor: start at
``--since`` or just after ``cursor`` and every record after it is seen once.
Field values are converted by converters of our own: systemd-python's
defaults turn ``EXIT_STATUS``-like fields into ints and leave what fails as bytes.
"""

from __future__ import annotations

import os
import time as _time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from systemd import journal

from clusterkit.report import EXIT_MESSAGE_ID

# systemd's catalog ids (src/systemd/sd-messages.h)
STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"  # SD_MESSAGE_UNIT_STARTING
STARTED = "39f53479d3a045ac8e11786248231fbf"  # SD_MESSAGE_UNIT_STARTED
STOPPING = "de5b426a63be47a7b6ac3eaac82e2f6f"  # SD_MESSAGE_UNIT_STOPPING

EVENTS = ("fork", "online", "listening", "disconnect", "exit")
_SYSTEMD_EVENTS = {STARTING: ("fork",), STARTED: ("online", "listening"), STOPPING: ("disconnect",)}


def _int_or_none(raw: bytes) -> int | None:
    text = raw.decode()
    return int(text) if text.lstrip("-").isdigit() else None


def _utc(usec: int) -> datetime:
    return datetime.fromtimestamp(usec / 1_000_000, UTC)


#: Every field we read, converted the same way whatever systemd-python's defaults do.
CONVERTERS: dict[str, Callable[[bytes], object]] = {
    "MESSAGE_ID": bytes.decode,
    "EXIT_STATUS": bytes.decode,
    "_PID": _int_or_none,
    "_UID": _int_or_none,
    "CLUSTERKIT_WORKER_ID": _int_or_none,
    "CLUSTERKIT_PID": _int_or_none,
    "CLUSTERKIT_EXIT_CODE": _int_or_none,
    "CLUSTERKIT_RESTARTS": _int_or_none,
    "CLUSTERKIT_STOP_REQUESTED": _int_or_none,
    "__REALTIME_TIMESTAMP": _utc,
}


@dataclass(frozen=True)
class Event:
    """One Node event about one worker run (``invocation_id`` names the run)."""

    event: str  # fork | online | listening | disconnect | exit
    worker: int  # the instance id K of NAME@K.service
    unit: str
    invocation_id: str | None
    time: datetime  # when the journal received the record (UTC)
    cursor: str = field(repr=False)
    pid: int | None = None  # exit only: the dead main pid
    code: int | None = None  # exit only: the exit status, when it exited
    signal: str | None = None  # exit only: "SIGKILL", when a signal killed it
    exited_after_disconnect: bool | None = None  # exit only: the stop was requested
    service_result: str | None = None  # exit only: systemd's $SERVICE_RESULT

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (``time`` in ISO 8601)."""
        d = asdict(self)
        d["time"] = self.time.isoformat()
        return d

    def describe(self) -> str:
        """A Node-like line: ``worker 2 (pid 1234) died: signal SIGKILL``."""
        who = f"worker {self.worker}" + (f" (pid {self.pid})" if self.pid else "")
        if self.event == "exit":
            how = f"signal {self.signal}" if self.signal else f"code {self.code}"
            verb = "exited after disconnect" if self.exited_after_disconnect else "died"
            return f"{who} {verb}: {how}"
        return {
            "fork": f"{who} forked",
            "online": f"{who} is online",
            "listening": f"{who} is listening",
            "disconnect": f"{who} disconnecting",
        }[self.event]


def _instance(unit: object, name: str) -> int | None:
    prefix, suffix = f"{name}@", ".service"
    if not isinstance(unit, str) or not (unit.startswith(prefix) and unit.endswith(suffix)):
        return None
    text = unit[len(prefix) : -len(suffix)]
    return int(text) if text.isdigit() else None


def parse(entry: dict[str, object], name: str, *, user: bool = False) -> list[Event]:
    """The events in one journal entry of cluster ``name``; [] if untrusted or unrelated."""
    message_id = entry.get("MESSAGE_ID")
    when = entry.get("__REALTIME_TIMESTAMP")
    cursor = str(entry.get("__CURSOR", ""))
    if not isinstance(when, datetime):
        return []
    uid = os.getuid() if user else 0
    if entry.get("_UID") != uid:
        return []
    if message_id == EXIT_MESSAGE_ID:
        unit = entry.get("CLUSTERKIT_UNIT")
        writer = entry.get("_SYSTEMD_USER_UNIT" if user else "_SYSTEMD_UNIT")
        worker = _instance(unit, name)
        if worker is None or writer != unit or entry.get("CLUSTERKIT_WORKER_ID") != worker:
            return []
        invocation = entry.get("CLUSTERKIT_INVOCATION_ID")
        run = entry.get("_SYSTEMD_INVOCATION_ID")
        if run is not None and run != invocation:
            return []
        stop = entry.get("CLUSTERKIT_STOP_REQUESTED")
        return [
            Event(
                "exit",
                worker,
                str(unit),
                str(invocation) if invocation else None,
                when,
                cursor,
                pid=_opt_int(entry.get("CLUSTERKIT_PID")),
                code=_opt_int(entry.get("CLUSTERKIT_EXIT_CODE")),
                signal=_opt_str(entry.get("CLUSTERKIT_SIGNAL")),
                exited_after_disconnect=None if stop is None else stop == 1,
                service_result=_opt_str(entry.get("CLUSTERKIT_SERVICE_RESULT")),
            )
        ]
    kinds = _SYSTEMD_EVENTS.get(str(message_id))
    if kinds is None:
        return []
    if user:
        trusted = entry.get("_SYSTEMD_USER_UNIT") == "init.scope"
        unit = entry.get("USER_UNIT")
    else:
        trusted = entry.get("_PID") == 1
        unit = entry.get("UNIT")
    worker = _instance(unit, name)
    if not trusted or worker is None:
        return []
    invocation = _opt_str(entry.get("INVOCATION_ID"))
    return [Event(kind, worker, str(unit), invocation, when, cursor) for kind in kinds]


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


class EventReader:
    """Events of cluster ``name`` in journal order: history, then (optionally) live.

    Start at ``since`` (a datetime), just after ``cursor`` (resume: the record
    at the cursor itself is skipped), or at the head of the journal. With
    ``at_end=True`` only records written from now on are read.
    """

    def __init__(
        self,
        name: str,
        *,
        user: bool = False,
        since: datetime | None = None,
        cursor: str | None = None,
        at_end: bool = False,
        exits_only: bool = False,
    ) -> None:
        self.name = name
        self.user = user
        self.cursor: str | None = cursor  # of the last record read: resume from here
        self._reader = journal.Reader(converters=CONVERTERS)
        self._match(exits_only)
        if cursor:
            self._reader.seek_cursor(cursor)
            # seek_cursor lands *on* the record: step onto it and skip it if it is there
            self._reader.get_next()
            if not self._reader.test_cursor(cursor):
                self._reader.seek_cursor(cursor)
        elif since is not None:
            self._reader.seek_realtime(since)
        elif at_end:
            self._reader.seek_tail()
            self._reader.get_previous()
        else:
            self._reader.seek_head()

    def _match(self, exits_only: bool) -> None:
        r = self._reader
        if not exits_only:
            ids = [f"MESSAGE_ID={i}" for i in _SYSTEMD_EVENTS]
            writer = "_SYSTEMD_USER_UNIT=init.scope" if self.user else "_PID=1"
            r.add_match(*ids, writer)
            r.add_disjunction()
        r.add_match(f"MESSAGE_ID={EXIT_MESSAGE_ID}", f"CLUSTERKIT_NAME={self.name}")

    def __iter__(self) -> Iterator[Event]:
        """The events recorded so far (from the start position), then stop."""
        while True:
            entry = self._reader.get_next()
            if not entry:
                return
            self.cursor = str(entry["__CURSOR"])
            yield from parse(entry, self.name, user=self.user)

    def follow(
        self, *, timeout: float | None = None, stop: Callable[[], bool] | None = None
    ) -> Iterator[Event]:
        """History, then new events as they are written, until ``timeout`` or ``stop()``."""
        deadline = None if timeout is None else _time.monotonic() + timeout
        while True:
            yield from self
            if stop is not None and stop():
                return
            left = None if deadline is None else deadline - _time.monotonic()
            if left is not None and left <= 0:
                return
            self._reader.wait(0.5 if left is None else min(left, 0.5))

    def close(self) -> None:
        self._reader.close()


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: ISO 8601 (local unless it says), ``@EPOCH``, or -30s, -5min, -2h, -1d."""
    now = now or datetime.now(UTC)
    text = text.strip()
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}
    if text.startswith("-"):
        number = text[1:].rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[1 + len(number) :] or "s"
        if number.replace(".", "", 1).isdigit() and unit in units:
            return datetime.fromtimestamp(now.timestamp() - float(number) * units[unit], UTC)
    elif text.startswith("@"):
        try:
            return datetime.fromtimestamp(float(text[1:]), UTC)
        except ValueError:
            pass
    else:
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.astimezone()
    raise ValueError(f"{text!r} is not a time (use ISO 8601, @EPOCH, or -30s, -5min, -2h, -1d)")
