"""Worker logging: the journal with the worker's identity as fields, else stderr.

Under systemd each record goes to the journal with ``CLUSTERKIT_NAME`` and
``CLUSTERKIT_WORKER_ID`` as fields, so ``journalctl CLUSTERKIT_WORKER_ID=2``
(or ``-u NAME@2.service``) selects one worker. Outside systemd (a laptop, a
test) records go to stderr prefixed with the worker id, like Node's console
in a worker. ``systemd.journal`` is imported only when used.
"""

from __future__ import annotations

import logging
import os
import sys

_JOURNAL_SOCKET = "/run/systemd/journal/socket"


def _under_journal() -> bool:
    # JOURNAL_STREAM: stderr is connected to the journal; INVOCATION_ID: we run in a unit.
    has_env = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    return has_env and os.path.exists(_JOURNAL_SOCKET)


def handler(name: str, worker_id: int) -> logging.Handler:
    """A journal handler carrying the worker's fields, or a stderr handler."""
    if _under_journal():
        from systemd.journal import JournalHandler

        h: logging.Handler = JournalHandler(
            SYSLOG_IDENTIFIER=name,
            CLUSTERKIT_NAME=name,
            CLUSTERKIT_WORKER_ID=str(worker_id),
        )
        h.setFormatter(logging.Formatter("%(message)s"))
        return h
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(f"[{name}:{worker_id} %(process)d] %(levelname)s %(message)s"))
    return h


def get_logger(name: str, worker_id: int) -> logging.Logger:
    """The ``clusterkit`` logger, given one handler the first time (idempotent)."""
    logger = logging.getLogger("clusterkit")
    if not any(getattr(h, "_clusterkit", False) for h in logger.handlers):
        h = handler(name, worker_id)
        h._clusterkit = True  # type: ignore[attr-defined]
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
