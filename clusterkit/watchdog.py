"""Keep-alive pings for ``WatchdogSec=`` (sd_watchdog_enabled(3) by hand).

systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, which must be our pid)
when the unit has ``WatchdogSec=``; if no ``WATCHDOG=1`` arrives within that
time it kills the worker (SIGABRT by default) and ``Restart=`` brings a fresh
one. We ping at half the interval, as sd_watchdog_enabled(3) recommends.

The ping must come from the thread that serves requests (the event loop),
never from a helper thread: a helper would keep pinging while the loop hangs,
which is exactly the failure the watchdog exists to catch. So this module only
decides *when*; the serving loop calls :meth:`Watchdog.ping_if_due`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from clusterkit import notify


class Watchdog:
    """Half-interval ping schedule; ``interval`` is None when no watchdog is set."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.interval = int(usec) / 2_000_000
        self._next = 0.0

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def ping(self) -> None:
        """Send WATCHDOG=1 now and schedule the next one."""
        if self.interval is None:
            return
        notify.watchdog()
        self._next = time.monotonic() + self.interval

    def due(self) -> bool:
        """True when a ping is due (never when the watchdog is off)."""
        return self.interval is not None and time.monotonic() >= self._next

    def ping_if_due(self) -> None:
        """Cheap to call often (every loop iteration): pings only when due."""
        if self.interval is not None and time.monotonic() >= self._next:
            self.ping()
