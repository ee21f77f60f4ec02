"""Node's ``cluster`` module: ``from clusterkit import cluster``.

Worker side (here): ``is_worker``, ``is_primary`` (``is_master``), ``worker``.
A process is a worker when a clusterkit unit started it, i.e. when
``CLUSTERKIT_WORKER_ID`` is set; anything else is the primary. The same script
serves both, as in Node::

    from clusterkit import cluster
    if cluster.is_primary:
        ...                      # cluster.workers, cluster.on("exit", ...)
    else:
        start_server()           # cluster.worker.id, .unit, .pid

A server script run directly (``python server.py``) is a primary by this rule
but can still serve on its own: :func:`clusterkit.worker.current` works in any
process and binds the port itself when systemd passed none (Python's
``if __name__ == "__main__": start_server()`` is Node's ``!module.parent``).

Primary side (``workers``, ``fork``, ``on``, ``disconnect``, ``settings``,
``scheduling_policy``...) lives in :mod:`clusterkit.primary` and is imported on
first use through the module ``__getattr__`` below, so a worker that imports
``cluster`` never loads it.
"""

from __future__ import annotations

from clusterkit import worker as _worker_mod
from clusterkit.worker import ThisWorker

is_worker: bool = _worker_mod.is_managed()
is_primary: bool = not is_worker
is_master: bool = is_primary  # Node's older name
worker: ThisWorker | None = _worker_mod.current() if is_worker else None


def __getattr__(name: str) -> object:
    """Everything else comes from clusterkit.primary, loaded lazily."""
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    try:
        primary = importlib.import_module("clusterkit.primary")
    except ModuleNotFoundError as e:
        if e.name != "clusterkit.primary":
            raise
        raise AttributeError(f"clusterkit.cluster has no attribute {name!r}") from None
    try:
        return getattr(primary, name)
    except AttributeError:
        raise AttributeError(f"clusterkit.cluster has no attribute {name!r}") from None
