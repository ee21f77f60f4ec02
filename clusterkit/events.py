"""Node's cluster events, read from the journal.

Every event comes from a record that PID 1 wrote about ``NAME@K.service``
(trusted: journald sets ``_PID=1`` from the sender's credentials, and no other
process can have it):

- ``fork``: "Starting NAME@K.service" (``MESSAGE_ID=7d4958e8…``);
- ``online``, ``listening``: "Started NAME@K.service" (``39f53479…``); with
  ``Type=notify`` that is the worker's ``READY=1``;
- ``disconnect``: "Stopping NAME@K.service" (``de5b426a…``): a requested stop
  began (Node also emits it on a crash; clusterkit does not);
- ``exit``: the end of the run, "Deactivated successfully" or "Failed with
  result 'X'" (:mod:`clusterkit.report` says which records complete it); or, when
  journald dropped that record (its rate limit for PID 1, see :mod:`clusterkit.journals`),
  a *lost* exit: ``lost`` true, ``code``, ``signal`` and ``service_result`` None, read
  at the first record of the worker's next run (the previous record of that unit a
  reader knows of is of another run, and not its end).

Under a user's manager the same records come from the user's systemd
(``_SYSTEMD_USER_UNIT=init.scope``), with ``USER_UNIT=``/``USER_INVOCATION_ID=``.

Readers read in journal order and can resume from a cursor: start at
``--since`` or just after ``cursor`` and every record after it is seen once.
The journal is opened, and its fields converted, by :mod:`clusterkit.journals`.
"""

from __future__ import annotations

import time as _time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from systemd import journal

from clusterkit import journals, names, report
from clusterkit.manager import Manager
from clusterkit.report import RUN_ENDED, STARTED, STARTING, STOPPING

EVENTS = ("fork", "online", "listening", "disconnect", "exit")
_SYSTEMD_EVENTS = {STARTING: ("fork",), STARTED: ("online", "listening"), STOPPING: ("disconnect",)}


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
    lost: bool | None = None  # exit only: PID 1's record of the end is missing (how: unknown)

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
            if self.lost:
                how = (
                    "how is unknown (no record of its end: journald dropped it, "
                    "or the host went down)"
                )
            verb = "exited after disconnect" if self.exited_after_disconnect else "died"
            return f"{who} {verb}: {how}"
        return {
            "fork": f"{who} forked",
            "online": f"{who} is online",
            "listening": f"{who} is listening",
            "disconnect": f"{who} disconnecting",
        }[self.event]


def _machine_id(entry: Mapping[str, object]) -> str:
    """The record's host as a journal match takes it (32 hex digits; the bindings give a
    UUID), or "" if it has none."""
    machine = entry.get("_MACHINE_ID")
    return machine.hex if isinstance(machine, uuid.UUID) else str(machine or "")


class EventReader:
    """Events of cluster ``name`` in journal order: history, then (optionally) live.

    Start at ``since`` (a datetime), just after ``cursor`` (resume: the record
    at the cursor itself is skipped), or at the head of the journal. With
    ``at_end=True`` only records written from now on are read. The journal is
    ``manager``'s (the local one, or the container's that ``up`` runs), or the
    files in ``directory`` (journals collected from other hosts), or only the
    journal ``files`` given (one sender's, on a collector). ``dropped(count, time)``, if
    given, is called in journal order for each of journald's records that it dropped
    ``count`` of the manager's records (exits before ``time`` may show as lost).
    """

    def __init__(
        self,
        name: str,
        *,
        manager: Manager | None = None,
        user: bool = False,
        since: datetime | None = None,
        cursor: str | None = None,
        at_end: bool = False,
        exits_only: bool = False,
        directory: str | None = None,
        files: Sequence[str] | None = None,
        dropped: Callable[[int, datetime], None] | None = None,
    ) -> None:
        self.name = name
        manager = manager or Manager("user" if user else "system")
        self.user = manager.user
        self.cursor: str | None = cursor  # of the last record read: resume from here
        self._manager = journals.manager_fields(manager)
        self._open = lambda: journals.open_reader(manager, directory=directory, files=files)
        self._reader = self._open()
        self._details: journal.Reader | None = None  # looks up one run's records
        self._exits_only = exits_only
        self._dropped = dropped
        # (host, worker) -> its last run this reader knows of, and whether its end was read:
        # a collector's directory holds several hosts' workers of the same numbers
        self._runs: dict[tuple[str, int], tuple[str, bool]] = {}
        ids = RUN_ENDED if exits_only else (*_SYSTEMD_EVENTS, *RUN_ENDED)
        self._reader.add_match(*(f"MESSAGE_ID={i}" for i in ids), self._manager.match_writer())
        if dropped is not None:
            self._reader.add_disjunction()
            self._reader.add_match(*self._manager.match_dropped())
        if cursor:
            journals.seek_after(self._reader, cursor)
        elif since is not None:
            self._reader.seek_realtime(since)
        elif at_end:
            self._reader.seek_tail()
            self._reader.get_previous()
        else:
            self._reader.seek_head()

    def __iter__(self) -> Iterator[Event]:
        """The events recorded so far (from the start position), then stop."""
        for entry in self._reader:  # up to the end of what is written now
            self.cursor = str(entry["__CURSOR"])
            count, when = self._manager.dropped(entry), _when(entry)
            if count is not None and when is not None and self._dropped is not None:
                self._dropped(count, when)
                continue
            found = self.parse(entry)
            if found and not self._exits_only:
                yield from self._lost_exit(found[0], _machine_id(entry))
            yield from found

    def last_exits(self, workers: Collection[int]) -> dict[int, Event]:
        """The last recorded exit of each of *workers*, read from the tail back: the run
        of only one exit per worker is looked up, however many the journal holds (status
        read them all from the head, a quarter of a millisecond each)."""
        self._reader.seek_tail()
        found: dict[int, Event] = {}
        while len(found) < len(workers) and (entry := self._reader.get_previous()):
            worker = names.worker_id(entry.get(self._manager.unit), self.name)
            if worker in workers and worker not in found:
                found.update((ev.worker, ev) for ev in self.parse(entry) if ev.event == "exit")
        return found

    def parse(self, entry: dict[str, object]) -> list[Event]:
        """The events in one of PID 1's records; [] if untrusted or about another unit."""
        m = self._manager
        when = entry.get("__REALTIME_TIMESTAMP")
        unit = entry.get(m.unit)
        worker = names.worker_id(unit, self.name)
        if not self._manager.wrote(entry) or worker is None or not isinstance(when, datetime):
            return []
        cursor = str(entry.get("__CURSOR", ""))
        invocation = report.invocation_id(entry.get(m.invocation))
        message_id = entry.get("MESSAGE_ID")
        if message_id in RUN_ENDED:
            if invocation is None:
                return []
            return [self._exit(str(unit), worker, invocation, entry, when, cursor)]
        kinds = _SYSTEMD_EVENTS.get(str(message_id), ())
        return [Event(kind, worker, str(unit), invocation, when, cursor) for kind in kinds]

    def _lost_exit(self, ev: Event, machine: str) -> list[Event]:
        """An exit for the worker's previous run on host *machine* (its ``_MACHINE_ID``)
        when ``ev`` is of another run and that run's end was never written (journald
        dropped it, or the host went down): its pid and requested stop are known, how it
        ended is not."""
        if ev.invocation_id is None:
            return []
        key = (machine, ev.worker)
        last = self._runs.get(key) or self._last_run(ev, machine)
        self._runs[key] = (ev.invocation_id, ev.event == "exit")
        if last is None or last[1] or last[0] == ev.invocation_id:
            return []
        run = self._run(ev.unit, last[0], ev.time)
        return [
            Event(
                "exit",
                ev.worker,
                ev.unit,
                last[0],
                ev.time,
                ev.cursor,
                pid=run.pid,
                exited_after_disconnect=run.stop_requested,
                lost=True,
            )
        ]

    def _last_run(self, ev: Event, machine: str) -> tuple[str, bool] | None:
        """The run of ``ev``'s unit on host *machine* in the record of it before ``ev``'s,
        and whether that record is the run's end: for the first record a reader reads of
        a worker."""
        m = self._manager
        r = self._lookup()
        ids = (*_SYSTEMD_EVENTS, *RUN_ENDED)
        host = [f"_MACHINE_ID={machine}"] if machine else []
        r.add_match(
            *(f"MESSAGE_ID={i}" for i in ids), f"{m.unit}={ev.unit}", *host, m.match_writer()
        )
        r.seek_cursor(ev.cursor)
        while entry := r.get_previous():
            invocation = report.invocation_id(entry.get(m.invocation))
            if entry["__CURSOR"] != ev.cursor and m.wrote(entry) and invocation is not None:
                return invocation, entry.get("MESSAGE_ID") in RUN_ENDED
        return None

    def _exit(
        self,
        unit: str,
        worker: int,
        invocation: str,
        end: dict[str, object],
        when: datetime,
        cursor: str,
    ) -> Event:
        run = self._run(unit, invocation, when)
        succeeded = end.get("MESSAGE_ID") == report.UNIT_SUCCESS
        code, signal = report.exit_status(run.pid1_exit, succeeded)
        return Event(
            "exit",
            worker,
            unit,
            invocation,
            when,
            cursor,
            pid=run.pid,
            code=code,
            signal=signal,
            exited_after_disconnect=run.stop_requested,
            service_result="success" if succeeded else report.unit_result(end.get("UNIT_RESULT")),
            lost=False,
        )

    def _run(self, unit: str, invocation: str, ended: datetime) -> _Run:
        """What the journal holds about one run, besides its end."""
        m = self._manager
        run = _Run()
        began: datetime | None = None
        r = self._lookup()  # PID 1's records of the run: a handful
        r.add_match(f"{m.invocation}={invocation}", m.match_writer())
        r.seek_head()
        for entry in r:
            if self._manager.wrote(entry) and entry.get(m.unit) == unit:
                began = began or _when(entry)
                if entry.get("MESSAGE_ID") == STOPPING:
                    run.stop_requested = True
                elif entry.get("MESSAGE_ID") == report.PROCESS_EXIT and (
                    entry.get("COMMAND") == "ExecStart"
                ):
                    run.pid1_exit = (str(entry.get("EXIT_CODE")), str(entry.get("EXIT_STATUS")))
        # The run's first line at the unit's level decides the pid: read it, no further (a
        # worker can write millions of lines at that level; reading them all took ~30 us
        # each, for every exit of that run)
        r = self._lookup()
        r.add_match(f"_SYSTEMD_INVOCATION_ID={invocation}", f"PRIORITY={report.PRIORITY}")
        r.seek_head()
        for entry in r:
            if entry.get(m.sender_unit) == unit:
                run.first_unit_line(entry)
                break
        if not run.first_seen and began is not None:
            # journald may not know the run of a short-lived sender (user units
            # especially): the unit's own lines written between the run's start and end.
            r = self._lookup()
            r.add_match(f"{m.sender_unit}={unit}", f"PRIORITY={report.PRIORITY}")
            by_user = m.match_user_lines(unit)
            if by_user is not None:
                r.add_disjunction()
                r.add_match(*by_user, f"PRIORITY={report.PRIORITY}")
            r.seek_realtime(began)
            entry = next(r, None)
            when = _when(entry) if entry is not None else None
            if when is not None and when <= ended:
                run.first_unit_line(entry)
        return run

    def _lookup(self) -> journal.Reader:
        """The second reader, for one run's records, with no matches yet."""
        if self._details is None:
            self._details = self._open()
        self._details.flush_matches()
        return self._details

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
        if self._details is not None:
            self._details.close()


@dataclass
class _Run:
    pid: int | None = None
    pid1_exit: tuple[str, str] | None = None  # PID 1's EXIT_CODE, EXIT_STATUS (unclean exits)
    stop_requested: bool = False
    first_seen: bool = False  # the run's first line at the unit's level was read

    def first_unit_line(self, entry: dict[str, object]) -> None:
        """The run's first line at the unit's level: its pid line
        (report.started_shell_command), which the command prints before exec'ing the
        worker, so through stdout and from that very pid; else the pid stays unknown. A
        worker can write the same text, naming any pid, and be the first: journald drops
        the genuine line when the unit has flooded its rate limit."""
        self.first_seen = True
        message = entry.get("MESSAGE")
        pid = report.parse_started(message) if isinstance(message, str) else None
        if pid is not None and entry.get("_PID") == pid and entry.get("_TRANSPORT") == "stdout":
            self.pid = pid


def _when(entry: dict[str, object]) -> datetime | None:
    when = entry.get("__REALTIME_TIMESTAMP")
    return when if isinstance(when, datetime) else None


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: ISO 8601 (local unless it says), ``@EPOCH``, or -30s, -5min, -2h, -1d."""
    now = now or datetime.now(UTC)
    text = text.strip()
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}
    try:
        if text.startswith("-"):
            number = text[1:].rstrip("abcdefghijklmnopqrstuvwxyz")
            unit = text[1 + len(number) :] or "s"
            if number.isascii() and number.replace(".", "", 1).isdigit() and unit in units:
                return datetime.fromtimestamp(now.timestamp() - float(number) * units[unit], UTC)
        elif text.startswith("@"):
            number = text[1:]
            if number.isascii() and number.replace(".", "", 1).isdigit():
                return datetime.fromtimestamp(float(number), UTC)
        else:
            parsed = datetime.fromisoformat(text)
            return parsed if parsed.tzinfo else parsed.astimezone()
    except (ValueError, OverflowError, OSError):  # not a date, or out of datetime's range
        pass
    raise ValueError(f"{text!r} is not a time (use ISO 8601, @EPOCH, or -30s, -5min, -2h, -1d)")
