"""The systems under test, by name. The first one is the baseline every ratio is taken against.

To add one (e.g. clusterkit-shared / clusterkit-reuseport): subclass bench.systems.base.System
in a new module and add a factory here.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.systems.base import System
from bench.systems.clusterkit import Clusterkit
from bench.systems.nodejs import NodeCluster, Pm2
from bench.systems.pythonweb import Gunicorn, GunicornUvicorn, Uvicorn

BASELINE = "node-cluster-rr"

SYSTEMS: dict[str, Callable[[], System]] = {
    "node-cluster-rr": lambda: NodeCluster("rr"),
    "node-cluster-none": lambda: NodeCluster("none"),
    "pm2": Pm2,
    "gunicorn": Gunicorn,
    "clusterkit-shared": lambda: Clusterkit("shared"),
    "clusterkit-reuseport": lambda: Clusterkit("reuseport"),
    # the server fixed, only the process model changes: ASGI (uvicorn, httptools) ...
    "uvicorn": Uvicorn,
    "gunicorn-uvicorn": GunicornUvicorn,
    "clusterkit-asgi": lambda: Clusterkit("shared", kind="asgi"),
    # ... and WSGI
    "clusterkit-wsgi": lambda: Clusterkit("shared", kind="wsgi"),
    "clusterkit-gunicorn": lambda: Clusterkit("shared", kind="gunicorn"),
}

#: references, not systems under test: measured only beside the systems of an interleaved
#: group (bench/run.py), never run alone nor given targets
REFERENCES: dict[str, Callable[[], System]] = {
    # serve_asyncio's units, their workers on the least a Python server can do per request
    "clusterkit-floor": lambda: Clusterkit("shared", kind="floor"),
}
