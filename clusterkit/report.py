"""The exit record: what the units write about each worker run, and how readers read it.

Exit events need no helper with privileges. PID 1 already writes a record
about every run of ``NAME@K.service`` (trusted: ``_PID=1``, which no other
process can claim), with the run's ``INVOCATION_ID``:

- ``UNIT_SUCCESS`` "Deactivated successfully." or ``UNIT_FAILED`` "Failed with
  result 'X'." (``UNIT_RESULT=X``): the run is over; this is the exit event;
- ``PROCESS_EXIT`` "Main process exited, code=…, status=…" (``EXIT_CODE=``
  exited/killed/dumped, ``EXIT_STATUS=`` a number, ``COMMAND=ExecStart``),
  written for every *unclean* exit: a code other than 0, or a signal other than
  SIGHUP/SIGINT/SIGTERM/SIGPIPE (systemd.service(5), ``SuccessExitStatus=``);
- ``STOPPING`` "Stopping …": a stop was requested (Node's ``exitedAfterDisconnect``).

PID 1 does not say which pid the run had, nor, for a clean end, whether it
was exit 0 or a clean signal (or a status added with ``SuccessExitStatus=``).
The pid comes from one line the worker's command prints before anything else
(:func:`started_shell_command`, the first step of the unit's ``ExecStart=``
shell, which then execs the worker in the same process): it runs as the
worker's own user, inside its sandbox, and prints to the unit's standard
output, which PID 1 connects to journald naming the unit, so the line carries
trusted ``_SYSTEMD_UNIT=``/``_SYSTEMD_INVOCATION_ID=``. The ``<5>`` prefix gives it
``PRIORITY=5`` (notice), which Python's logging never uses, so readers find it
without scanning the run's whole log; the first such line of a run counts. A
clean end is reported as exit 0: telling it apart from a clean signal would
take a command after the exit (``ExecStopPost=``), and every command systemd
starts in the sandbox costs a fresh mount namespace on the respawn path
(``bench/SANDBOX.md``). A worker flooding its journal can get the pid
line dropped by journald's rate limit; PID 1's records are counted against
``init.scope``, not the worker, so the exit event itself survives (its pid is
then unknown).

Stdlib only: :mod:`clusterkit.render` writes the command, :mod:`clusterkit.events` reads.
"""

from __future__ import annotations

import re
import signal as _signal
from collections.abc import Mapping

# systemd's catalog ids (src/systemd/sd-messages.h), all written by PID 1
STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"  # SD_MESSAGE_UNIT_STARTING
STARTED = "39f53479d3a045ac8e11786248231fbf"  # SD_MESSAGE_UNIT_STARTED
STOPPING = "de5b426a63be47a7b6ac3eaac82e2f6f"  # SD_MESSAGE_UNIT_STOPPING
PROCESS_EXIT = "98e322203f7a4ed290d09fe03c09fe15"  # SD_MESSAGE_UNIT_PROCESS_EXIT
UNIT_SUCCESS = "7ad2d189f7e94e70a38c781354912448"  # SD_MESSAGE_UNIT_SUCCESS
UNIT_FAILED = "d9b373ed55a64feb8242e02dbe79a49c"  # SD_MESSAGE_UNIT_FAILURE_RESULT
RUN_ENDED = (UNIT_SUCCESS, UNIT_FAILED)

#: the unit's own line per run: the worker's pid, with a syslog level prefix
PRIORITY = 5
_PREFIX = "clusterkit: "
_STARTED = re.compile(_PREFIX + r"started pid=([1-9][0-9]{0,9})")


def started_shell_command() -> str:
    """Shell command, first in the unit's ``ExecStart=`` shell: one line with its pid
    (``$$``), which stays the worker's when the shell execs it."""
    return f'echo "<{PRIORITY}>{_PREFIX}started pid=$$"'


def parse_started(message: str) -> int | None:
    m = _STARTED.fullmatch(message)
    return int(m.group(1)) if m else None


def is_unit_line(entry: Mapping[str, object]) -> bool:
    """Whether a journal entry is the unit's own pid line.

    Both the level (``PRIORITY=5``) and the exact form: log readers leave this
    line out, as an event; the same text at another level is the worker's log.
    """
    message = entry.get("MESSAGE")
    return (
        entry.get("PRIORITY") == PRIORITY
        and isinstance(message, str)
        and parse_started(message) is not None
    )


#: what PID 1 writes: a signal's name (``KILL``, ``RTMIN+3``) or number; a record
#: uploaded to a fleet's collector can say anything, so anything else is no signal
_SIGNAL = re.compile(r"(?:SIG)?([A-Z][A-Z0-9]{0,15}(?:\+[0-9]{1,2})?|[0-9]{1,3})")
_EXIT_CODE = re.compile(r"[0-9]{1,3}")  # 0-255; never int() of a forged 5,000 digits
_UNIT_RESULT = re.compile(r"[a-z][a-z-]{0,31}")  # success, exit-code, start-limit-hit, ...
_INVOCATION_ID = re.compile(r"[0-9a-f]{32}")


def signal_name(status: str) -> str | None:
    """``KILL`` or ``9`` -> ``SIGKILL`` (Node's signal names); None if it is no signal."""
    m = _SIGNAL.fullmatch(status)
    if m is None:
        return None
    name = m.group(1)
    if name.isdigit():
        try:
            return _signal.Signals(int(name)).name
        except ValueError:
            pass
    return f"SIG{name}"


def unit_result(value: object) -> str | None:
    """PID 1's ``UNIT_RESULT`` (``exit-code``, ``signal``, ...), None if it is none."""
    return value if isinstance(value, str) and _UNIT_RESULT.fullmatch(value) else None


def invocation_id(value: object) -> str | None:
    """An ``INVOCATION_ID`` field (128 bits, in hex), None if it is none."""
    return value if isinstance(value, str) and _INVOCATION_ID.fullmatch(value) else None


def exit_status(
    pid1_exit: tuple[str, str] | None, succeeded: bool
) -> tuple[int | None, str | None]:
    """(code, signal) of a run, Node's ``exit`` arguments.

    ``pid1_exit`` is PID 1's (EXIT_CODE, EXIT_STATUS), written for unclean
    exits only. Without it, a successful run is reported as exit 0.
    """
    kind, status = pid1_exit or (("exited", "0") if succeeded else ("", ""))
    if kind == "exited" and _EXIT_CODE.fullmatch(status):
        return int(status), None
    if kind in ("killed", "dumped") and status:
        return None, signal_name(status)
    return None, None
