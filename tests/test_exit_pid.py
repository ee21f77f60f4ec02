"""The pid of an exit event: only the unit's own pid line names it, never a worker's.

Each case writes a journal file with systemd-journal-remote (export format in, the
journal format the host's journald writes out) and reads it with clusterkit's
EventReader, as `clusterkit events` reads a fleet's collector. No container needed.
The real attack takes a unit flooding journald's rate limit until its next run's
genuine pid line is dropped, then printing a line of its own (reproduced on systemd
252: `events` named pid 1 for a run whose main pid was 66).

Also a run whose end PID 1 wrote but journald dropped: it ends as lost when the next
run begins, and only journald's own record of the drop warns (the container test is
test_trust_boundary.py's test_exits_are_reported_when_a_worker_floods_pid1_records_away).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clusterkit.events import EventReader

JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"
UNIT = "t@0.service"
#: PID 1's message ids: starting, started, process exited, failed
STARTING, STARTED = "7d4958e842da4a758f6c1cdc7b36dcc5", "39f53479d3a045ac8e11786248231fbf"
EXITED, FAILED = "98e322203f7a4ed290d09fe03c09fe15", "d9b373ed55a64feb8242e02dbe79a49c"

pytestmark = pytest.mark.skipif(
    not os.access(JOURNAL_REMOTE, os.X_OK) and not os.environ.get("CI"),
    reason="needs systemd-journal-remote (apt-get install systemd-journal-remote)",
)


def pid1(message_id: str, invocation: str, message: str, **fields: str) -> dict[str, str]:
    return {
        "MESSAGE": message,
        "MESSAGE_ID": message_id,
        "UNIT": UNIT,
        "INVOCATION_ID": invocation,
        "_PID": "1",
        "_UID": "0",
        "_SYSTEMD_UNIT": "init.scope",
        "PRIORITY": "6",
        **fields,
    }


def unit_line(invocation: str, message: str, pid: int, transport: str = "stdout"):
    """A line of the unit's processes at its own level (what `<5>` on stdout makes)."""
    return {
        "MESSAGE": message,
        "PRIORITY": "5",
        "_PID": str(pid),
        "_UID": "61000",
        "_SYSTEMD_UNIT": UNIT,
        "_SYSTEMD_INVOCATION_ID": invocation,
        "_TRANSPORT": transport,
    }


def _journal(
    tmp_path: Path, entries: list[dict[str, str]], host: str = "h", every_us: int = 1
) -> str:
    """A journal file of host *host* holding *entries*, in order, *every_us* apart
    (systemd-journal-remote writes it)."""
    boot, machine = uuid.uuid4().hex, uuid.uuid4().hex
    export = "".join(
        "".join(
            f"{k}={v}\n"
            for k, v in {
                "__REALTIME_TIMESTAMP": str(1_700_000_000_000_000 + i * every_us),
                "__MONOTONIC_TIMESTAMP": str(1000 + i),
                "_BOOT_ID": boot,
                "_MACHINE_ID": machine,
                "_HOSTNAME": host,
                **entry,
            }.items()
        )
        + "\n"
        for i, entry in enumerate(entries)
    )
    path = tmp_path / f"remote-{host}.journal"
    subprocess.run(
        [JOURNAL_REMOTE, "--compress=no", "-o", str(path), "-"],
        input=export.encode(),
        check=True,
        capture_output=True,
    )
    return str(path)


def killed_run_pid(tmp_path: Path, *lines) -> int | None:
    """The pid `events` gives the SIGKILLed run whose unit wrote *lines* (each made by
    unit_line from the run's invocation id)."""
    invocation = uuid.uuid4().hex
    entries = [
        pid1(STARTING, invocation, "Starting t@0..."),
        *(line(invocation) for line in lines),
        pid1(STARTED, invocation, "Started t@0."),
        pid1(EXITED, invocation, "Main process exited", EXIT_CODE="killed", EXIT_STATUS="9")
        | {"COMMAND": "ExecStart"},
        pid1(FAILED, invocation, "Failed with result 'signal'.", UNIT_RESULT="signal"),
    ]
    path = _journal(tmp_path, entries)
    exits = [e for e in EventReader("t", files=[path]) if e.event == "exit"]
    assert [(e.worker, e.signal) for e in exits] == [(0, "SIGKILL")]
    return exits[0].pid


def test_the_units_pid_line_names_the_pid(tmp_path: Path):
    line = lambda inv: unit_line(inv, "clusterkit: started pid=777", 777)  # noqa: E731
    assert killed_run_pid(tmp_path, line) == 777


@pytest.mark.parametrize(
    "forged",
    [
        # the genuine line dropped by the rate limit, the worker (pid 777) prints its own
        pytest.param(lambda inv: unit_line(inv, "clusterkit: started pid=4242", 777), id="pid"),
        # the same text sent to journald's socket (logger, sd_journal_print), not stdout
        pytest.param(
            lambda inv: unit_line(inv, "clusterkit: started pid=777", 777, "journal"),
            id="transport",
        ),
        # the run's first line at that level is not a pid line: no later one counts
        pytest.param(lambda inv: unit_line(inv, "flood", 777), id="not-first"),
    ],
)
def test_a_line_a_worker_can_write_names_no_pid(tmp_path: Path, forged):
    later = lambda inv: unit_line(inv, "clusterkit: started pid=777", 777)  # noqa: E731
    assert killed_run_pid(tmp_path, forged, later) is None


def dropped_record(unit: str, **fields: str) -> dict[str, str]:
    """journald's own "Suppressed N messages from UNIT" (``fields`` as a forger sets them)."""
    return {
        "MESSAGE": f"Suppressed 7 messages from {unit}",
        "MESSAGE_ID": "a596d6fe7bfa4994828e72309e95d61e",
        "N_DROPPED": "7",
        "OBJECT_SYSTEMD_UNIT": unit,
        "_PID": "30",
        "_UID": "0",
        "_TRANSPORT": "driver",
        **fields,
    }


def test_a_run_whose_end_was_dropped_ends_as_lost_when_the_next_begins(tmp_path: Path):
    """journald dropped PID 1's records of the first run's end: the next run's start
    reports it, pid known, how unknown; also to a reader that begins after that run's
    start. Only journald's own record of the drop is a warning."""
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    path = _journal(
        tmp_path,
        [
            pid1(STARTING, first, "Starting t@0..."),
            unit_line(first, "clusterkit: started pid=777", 777),
            pid1(STARTED, first, "Started t@0."),
            dropped_record("init.scope", _TRANSPORT="journal", _UID="61000"),  # forged
            dropped_record("t@0.service"),  # the worker's own lines: no exit is missing
            pid1(STARTING, second, "Starting t@0..."),
            dropped_record("init.scope"),
            pid1(STARTED, second, "Started t@0."),
        ],
    )
    drops: list[int] = []
    reader = EventReader("t", files=[path], dropped=lambda n, when: drops.append(n))
    seen = [(e.event, e.invocation_id, e.pid, e.code, e.signal, e.lost) for e in reader]
    assert seen[3:5] == [
        ("exit", first, 777, None, None, True),
        ("fork", second, None, None, None, None),
    ]
    assert [e[0] for e in seen] == [
        "fork",
        "online",
        "listening",
        "exit",
        "fork",
        "online",
        "listening",
    ]
    assert drops == [7]
    for since in (2, 5):  # after the first run's start, or just after its last record
        start = datetime.fromtimestamp(1_700_000_000, UTC) + timedelta(microseconds=since)
        later = [
            (e.event, e.invocation_id, e.lost) for e in EventReader("t", files=[path], since=start)
        ]
        assert [e for e in later if e[0] == "exit"] == [("exit", first, True)], later


def test_the_same_worker_on_two_hosts_is_two_workers(tmp_path: Path):
    """A collector's directory: worker 0 of cluster t on two hosts, each run started and
    ended, their records interleaved in time. Each host's t@0 is its own: no run is taken
    for the other's next one and reported lost (a review saw every run end four times)."""
    for host in ("a", "b"):
        run = uuid.uuid4().hex
        ended = pid1(FAILED, run, "Deactivated successfully.")  # d9b373ed: ended well
        _journal(
            tmp_path,
            [pid1(STARTING, run, "Starting t@0..."), pid1(STARTED, run, "Started t@0."), ended],
            host=host,
            every_us=10,
        )
    events = [(e.event, e.lost) for e in EventReader("t", directory=str(tmp_path))]
    assert sorted(events, key=str) == sorted(
        [("fork", None), ("online", None), ("listening", None), ("exit", False)] * 2, key=str
    ), events
