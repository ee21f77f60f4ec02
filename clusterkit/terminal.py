"""The app's text on the operator's terminal: shown, never obeyed.

A worker writes what it likes to the journal: through the native protocol a
``MESSAGE`` holds any bytes. ``clusterkit logs``, ``status``, ``events --logs``,
``fleet logs`` and ``up`` show those messages to root, often in a terminal.
Written as they are, an escape sequence would act on that terminal (clear it,
retitle the window, set the clipboard with OSC 52, on some terminals answer back
as typed input), and a CR, a vertical tab or U+2028 would make what follows look
like a line of clusterkit's own. So every character that is not printable by
Python's own rule (``str.isprintable``, the one ``repr`` uses; tab is kept) is
shown as its Python escape, e.g. ``\\x1b`` or ``\\u202e``. A message's own line
ends (LF, CRLF) are kept as continuation lines, each under a prefix the caller
gives, so a traceback stays readable and no line of it can pose as a record of its
own. ``--json`` output needs none of this: ``json.dumps`` escapes the same
characters.
"""

from __future__ import annotations

import re

_LINE_END = re.compile(r"\r?\n")


def _escape(char: str) -> str:
    return char if char.isprintable() or char == "\t" else repr(char)[1:-1]


def escaped(text: str) -> str:
    """*text* with every character that is not printable (tab apart) as its escape."""
    if text.isprintable():  # the common case: one pass in C
        return text
    return "".join(map(_escape, text))


def lines(text: str, continuation: str) -> str:
    """*text* escaped, its line ends (LF or CRLF) kept: each following line begins with
    *continuation*."""
    return ("\n" + continuation).join(map(escaped, _LINE_END.split(text.rstrip("\r\n"))))
