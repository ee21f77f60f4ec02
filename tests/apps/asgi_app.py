"""A plain ASGI app for stock uvicorn (scenario j): it answers with the worker id.

Knows nothing of clusterkit: the id comes from ``CLUSTERKIT_WORKER_ID``, which
the unit sets for every worker.
"""

from __future__ import annotations

import os
from typing import Any

WORKER = os.environ.get("CLUSTERKIT_WORKER_ID", "?")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer every HTTP request with ``uvicorn ID``."""
    if scope["type"] != "http":
        return
    body = f"uvicorn {WORKER}\n".encode()
    headers = [(b"content-type", b"text/plain"), (b"x-worker", WORKER.encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
