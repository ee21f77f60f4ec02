"""Serve examples/fastapi/app.py with uvicorn, on the socket systemd passed.

systemd runs this file in every worker (``exec`` in pyproject.toml). Run
directly (``python serve.py``) it binds port 3002 itself.
"""

from __future__ import annotations

import logging

from app import app

from clusterkit.serve import serve_asgi


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    serve_asgi(app, 3002)


if __name__ == "__main__":
    main()
