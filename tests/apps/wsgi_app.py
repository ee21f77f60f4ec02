"""A plain WSGI app for stock gunicorn (scenario j): it answers with the worker id.

Knows nothing of clusterkit: the id comes from ``CLUSTERKIT_WORKER_ID``, which
the unit sets for every worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

WORKER = os.environ.get("CLUSTERKIT_WORKER_ID", "?")


def app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    """Answer every request with ``gunicorn ID``."""
    body = f"gunicorn {WORKER}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Worker", WORKER)])
    return [body]
