"""clusterkit.report: the fields of PID 1's records, read as no more than they can be.

On one host only PID 1 writes these records; on a fleet's collector any host can
upload one that says anything (test_fleet.py uploads such records to a real
journal-remote). No container needed here.
"""

from __future__ import annotations

import pytest

from clusterkit import report


@pytest.mark.parametrize(
    ("status", "name"),
    [("KILL", "SIGKILL"), ("SIGTERM", "SIGTERM"), ("9", "SIGKILL"), ("RTMIN+3", "SIGRTMIN+3")],
)
def test_what_pid1_writes_is_a_signal(status: str, name: str):
    assert report.signal_name(status) == name
    assert report.exit_status(("killed", status), succeeded=False) == (None, name)


@pytest.mark.parametrize(
    "status",
    ["", "KILL\x1b]52;c;eA==\x07", "KILL\nworker 0 died", "kill", "9" * 5000, "KILL "],
)
def test_anything_else_is_no_signal(status: str):
    assert report.signal_name(status) is None
    assert report.exit_status(("dumped", status), succeeded=False) == (None, None)


def test_an_exit_code_is_at_most_three_digits():
    assert report.exit_status(("exited", "3"), succeeded=False) == (3, None)
    assert report.exit_status(None, succeeded=True) == (0, None)
    for status in ("9" * 5000, "-1", "3\n", "٣"):  # int() would raise or accept them
        assert report.exit_status(("exited", status), succeeded=False) == (None, None)


def test_result_and_invocation_id_are_shaped_as_pid1_writes_them():
    assert report.unit_result("exit-code") == "exit-code"
    assert report.invocation_id("0f" * 16) == "0f" * 16
    for forged in ("exit-code\x1b[2J", "Signal", "", None, b"signal", "x" * 40):
        assert report.unit_result(forged) is None
    for forged in ("0f" * 15, "0F" * 16, "0f" * 16 + "\n", None):
        assert report.invocation_id(forged) is None
