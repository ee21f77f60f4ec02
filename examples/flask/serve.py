"""Serve examples/flask/app.py with waitress, on the socket systemd passed.

systemd runs this file in every worker (``exec`` in pyproject.toml). Run
directly (``python serve.py``) it binds port 3001 itself.
"""

from __future__ import annotations

import logging

from app import WORKER_ID, app, log

from clusterkit.serve import serve_wsgi


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    log.info("worker %s: Flask app loaded, serving", WORKER_ID)
    serve_wsgi(app, 3001)


if __name__ == "__main__":
    main()
