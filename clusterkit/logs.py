"""The workers' own log records: what they printed and logged, with the worker's id.

Every process of ``NAME@K.service`` runs in the slice systemd makes for the
template (``system-NAME.slice``; ``app-NAME.slice`` under a user's manager), so
one journal match (``_SYSTEMD_SLICE``, a trusted field journald sets from the
sender's cgroup) finds them all; the worker id comes from the trusted
``_SYSTEMD_UNIT``. The unit's own pid lines (:mod:`clusterkit.report`) are
left out: they are events, not logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from clusterkit import journals, names, report, terminal
from clusterkit.manager import Manager

#: characters of one message shown to a person (journalctl shows 4096 bytes of a field
#: unless --all): a worker can log a message of many MiB, and every command that shows it
#: would print all of it (--json gives the message whole)
SHOWN = 4096


def shortened(message: str) -> str:
    """*message*, cut to :data:`SHOWN` characters with a note of how many were left out."""
    if len(message) <= SHOWN:
        return message
    return f"{message[:SHOWN]} [... {len(message) - SHOWN} more characters]"


@dataclass(frozen=True)
class LogLine:
    time: datetime
    worker: int
    pid: int | None
    priority: int | None
    message: str

    def to_json(self) -> dict[str, object]:
        return {
            "time": self.time.isoformat(),
            "worker": self.worker,
            "pid": self.pid,
            "priority": self.priority,
            "message": self.message,
        }

    def describe(self) -> str:
        """One line per line of the message, the first with time and worker, the others
        indented: shown safely on a terminal (:mod:`clusterkit.terminal`)."""
        pid = f"[{self.pid}]" if self.pid else ""
        message = terminal.lines(shortened(self.message), continuation="    ")
        return f"{self.time.astimezone():%Y-%m-%d %H:%M:%S} worker {self.worker}{pid}: {message}"


def slice_name(name: str, user: bool) -> str:
    """The slice of NAME@.service's instances (systemd.unit(5): '-' escaped as \\x2d)."""
    escaped = name.replace("-", "\\x2d")
    return f"{'app' if user else 'system'}-{escaped}.slice"


class LogReader:
    """Log lines of cluster ``name`` (or of one ``worker``), oldest first; ``follow`` for more."""

    def __init__(
        self,
        name: str,
        *,
        manager: Manager | None = None,
        worker: int | None = None,
        invocation: str | None = None,
        since: datetime | None = None,
        lines: int | None = None,
    ) -> None:
        self.name = name
        self.manager = manager or Manager()
        self._reader = journals.open_reader(self.manager)
        user = self.manager.user
        self._unit_field = journals.manager_fields(self.manager).sender_unit
        if worker is not None:
            self._reader.add_match(f"{self._unit_field}={names.service(name, worker)}")
            if invocation is not None:  # one run of it
                self._reader.add_match(f"_SYSTEMD_INVOCATION_ID={invocation}")
        else:
            slice_field = "_SYSTEMD_USER_SLICE" if user else "_SYSTEMD_SLICE"
            self._reader.add_match(f"{slice_field}={slice_name(name, user)}")
        if since is not None:
            self._reader.seek_realtime(since)
        elif lines is not None:
            # Back up ``lines`` records, then start *at* the earliest of them.
            self._reader.seek_tail()
            earliest = None
            for _ in range(lines):
                entry = self._reader.get_previous()
                if not entry:
                    break
                earliest = entry["__CURSOR"]
            if earliest is not None:
                self._reader.seek_cursor(earliest)
            else:
                self._reader.seek_tail()
        else:
            self._reader.seek_head()

    def __iter__(self) -> Iterator[LogLine]:
        for entry in self._reader:  # up to the end of what is written now
            line = self._line(entry)
            if line is not None:
                yield line

    def _line(self, entry: dict[str, object]) -> LogLine | None:
        return log_line(entry, self.name, self._unit_field)

    def follow(self, *, stop: Callable[[], bool] | None = None) -> Iterator[LogLine]:
        while True:
            yield from self
            if stop is not None and stop():
                return
            self._reader.wait(0.5)

    def close(self) -> None:
        self._reader.close()


def log_line(entry: dict[str, object], name: str, unit_field: str) -> LogLine | None:
    """The log line in a journal entry of a worker of cluster *name* (the worker named by
    *unit_field*, a trusted field); None for another sender or the unit's own pid line.
    A field that is not what journald writes (a record uploaded to a fleet's collector
    says what it likes) counts as missing."""
    worker = names.worker_id(entry.get(unit_field), name)
    message = entry.get("MESSAGE")
    when = entry.get("__REALTIME_TIMESTAMP")
    if worker is None or not isinstance(when, datetime):
        return None
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    if not isinstance(message, str) or report.is_unit_line(entry):
        return None
    pid, priority = entry.get("_PID"), _priority(entry)
    return LogLine(when, worker, pid if isinstance(pid, int) else None, priority, message)


def _priority(entry: dict[str, object]) -> int | None:
    value = entry.get("PRIORITY")  # an int by systemd-python's own converter
    return value if isinstance(value, int) else None


def last_lines(
    name: str, worker: int, manager: Manager, count: int = 3, invocation: str | None = None
) -> list[str]:
    """The last ``count`` messages of one worker, or of one run of it (why it died, often)."""
    reader = LogReader(name, manager=manager, worker=worker, invocation=invocation, lines=count + 2)
    try:
        return [shortened(line.message) for line in reader][-count:]
    finally:
        reader.close()
