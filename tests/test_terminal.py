"""clusterkit.terminal: what may reach the operator's terminal (no container needed;
the container tests of logs, status, events and up show it on real journal records;
tests/test_up_probe.py what up shows of the app's answer to GET /)."""

from __future__ import annotations

from clusterkit import terminal


def test_printable_text_is_shown_as_it_is():
    for text in ("hello", "Café — 東京 ☕", "a\tb", "quotes ' \" and \\ backslash", ""):
        assert terminal.escaped(text) == text


def test_every_control_separator_and_format_character_is_escaped():
    hostile = "\x00\x07\x1b\r\v\f\x1c\x7f\x85\x9b\xa0\u200b\u200e\u2028\u2029\u202e\u2066\ufeff"
    shown = terminal.escaped(hostile)
    assert shown.isprintable() and shown.isascii(), shown
    assert shown == hostile.encode("unicode_escape").decode().replace("\\t", "\t")


def test_line_feeds_become_continuation_lines():
    shown = terminal.lines("first\nworker 0: forged\x1b[2J\n", continuation="    | ")
    assert shown == "first\n    | worker 0: forged\\x1b[2J"
    assert terminal.lines("one line", continuation="  ") == "one line"
    assert terminal.lines("a\r\nb\rc\r\n", continuation="  ") == "a\n  b\\rc"  # a bare CR


def test_a_workers_bytes_that_are_no_utf8_come_back_replaced():
    """What root's commands read back through a manager (`up` shows a failing worker's
    last journal lines, which journalctl passes through as the worker wrote them): bytes
    that are no UTF-8 are replaced, never a UnicodeDecodeError and a traceback."""
    from clusterkit.manager import Manager

    out = Manager("system").run("printf", "caf\\351 \\377\\n").stdout
    assert out == "caf\ufffd \ufffd\n"
    assert terminal.escaped(out.strip()) == "caf\ufffd \ufffd"
