"""The operation commands' arguments: anything but what they name is refused with exit 2
and one line, before any cluster or journal is looked at (no container needed)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest

from clusterkit.events import parse_since

REFUSED = [
    (["kill", "web", "-1"], "argument id: '-1' is not a worker id"),
    (["kill", "web", "3_0"], "argument id: '3_0' is not a worker id"),  # int() takes it
    (["kill", "web", "\u0663"], "is not a worker id"),  # an Arabic-Indic 3: int() takes it
    (["kill", "web", "9" * 5000], "is not a worker id"),
    (["disconnect", "web", "x"], "argument id: 'x' is not a worker id"),
    (["scale", "web", "2000"], "is not a number of workers (0-1024)"),
    (["scale", "web", " 3"], "is not a number of workers (0-1024)"),
    (["logs", "web", "-n", "0"], "argument --lines/-n: '0' is not a number of lines"),
    (["logs", "web", "--worker", "-2"], "argument --worker: '-2' is not a worker id"),
    (["logs", "web", "--since=@99999999999999999"], "--since: '@99999999999999999' is not a"),
    (["logs", "web", "--since=-99999999999d"], "--since: '-99999999999d' is not a time"),
    (["events", "web", "--since=@inf"], "--since: '@inf' is not a time"),
    (["events", "web", "--since=@nan"], "--since: '@nan' is not a time"),
    (["events", "web", "--since=-\u0665min"], "is not a time"),
]


@pytest.mark.parametrize(("argv", "error"), REFUSED, ids=lambda x: " ".join(x)[:40])
def test_refused_with_exit_2_and_one_line(argv: list[str], error: str):
    r = subprocess.run(
        [sys.executable, "-m", "clusterkit.cli", *argv], capture_output=True, text=True
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and error in r.stderr, r.stderr
    assert r.stdout == ""


def test_since_reads_what_it_documents():
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    assert parse_since("-5min", now) == datetime(2026, 11, 29, 11, 55, tzinfo=UTC)
    assert parse_since("-1.5h", now) == datetime(2026, 11, 29, 10, 30, tzinfo=UTC)
    assert parse_since("@0", now) == datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_since("2026-11-29T10:00:00+00:00") == datetime(2026, 11, 29, 10, tzinfo=UTC)
