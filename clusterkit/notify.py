"""sd_notify(3) for a worker: the few messages clusterkit sends to systemd.

The protocol: one datagram of ``KEY=VALUE`` lines to the unix socket named by
``$NOTIFY_SOCKET`` (``@`` means the abstract namespace). systemd-python's
``systemd.daemon.notify`` does the sending; outside systemd the variable is
unset and every call is a cheap no-op that returns False.

- ``READY=1``: the unit is ``Type=notify``; systemd counts the worker as
  started (``online``/``listening`` in Node's terms) only once it is sent.
- ``STATUS=...``: free text shown by ``systemctl status``.
- ``STOPPING=1``: sd_notify(3) says "beginning its shutdown", so it is sent when
  the drain starts, not at the very end.
- ``WATCHDOG=1``: keep-alive for ``WatchdogSec=``; see :mod:`clusterkit.watchdog`.
"""

from __future__ import annotations

import os

from systemd import daemon


def notify(state: str) -> bool:
    """Send *state* (newline-separated assignments); False when not under systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    return bool(daemon.notify(state))


def ready(status: str | None = None) -> bool:
    """READY=1, with an optional STATUS= line in the same datagram."""
    return notify("READY=1" if status is None else f"READY=1\nSTATUS={status}")


def status(text: str) -> bool:
    """STATUS=<text>; newlines would start a new assignment, so they are flattened."""
    return notify("STATUS=" + text.replace("\n", " "))


def stopping(status: str | None = None) -> bool:
    """STOPPING=1: the worker has begun its graceful shutdown."""
    return notify("STOPPING=1" if status is None else f"STOPPING=1\nSTATUS={status}")


def watchdog() -> bool:
    """WATCHDOG=1: "still alive". Send it only from the loop that serves requests."""
    return notify("WATCHDOG=1")
