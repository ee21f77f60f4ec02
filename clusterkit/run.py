"""``python -m clusterkit.run asgi|wsgi MODULE:APP``: serve an app with no script of your own.

The stock servers signal readiness too early under a unit: uvicorn sends no
``READY=1`` at all (``Type=exec`` counts it ready at exec, before the app is
imported), so a rolling reload sends requests to a worker that is still
importing. This imports the app first, then serves it with
:func:`clusterkit.serve.serve_asgi` (uvicorn) or :func:`clusterkit.serve.serve_wsgi`
(waitress) on the socket systemd passed, which send ``READY=1`` only once they
accept. ``MODULE`` is imported from the working directory (``--working-directory``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any


def load(target: str) -> Any:
    """``package.module:attribute`` -> the object (``:app`` by default)."""
    module_name, _, attribute = target.partition(":")
    if not module_name:
        raise SystemExit(f"clusterkit.run: {target!r} is not MODULE:APP")
    sys.path.insert(0, ".")  # python -m puts the cwd first; keep that for the app's package
    app: Any = importlib.import_module(module_name)
    for part in (attribute or "app").split("."):
        app = getattr(app, part)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterkit.run", description=__doc__)
    parser.add_argument("kind", choices=("asgi", "wsgi"))
    parser.add_argument("target", metavar="MODULE:APP")
    parser.add_argument("--port", default=3000, type=int, help="when no socket is passed (dev)")
    args = parser.parse_args(argv)
    app = load(args.target)  # the whole import happens before READY=1
    from clusterkit import serve

    (serve.serve_asgi if args.kind == "asgi" else serve.serve_wsgi)(app, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
