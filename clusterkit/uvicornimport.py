"""uvicorn's ``Config`` and ``Server``, imported without uvicorn's command line.

``import uvicorn`` runs ``uvicorn/__init__.py``, which imports ``uvicorn.main``:
click and the multi-process supervisors. A clusterkit worker uses neither, and
they cost about 25 ms of each worker (re)start, two fifths of uvicorn's import and
a tenth of a respawn. So when nothing has imported uvicorn yet,
:func:`config_and_server` registers the package without running its
``__init__`` and imports only ``uvicorn.config`` and ``uvicorn.server``. The
first use of any other name of the package (``uvicorn.run``,
``uvicorn.__version__``, ``from uvicorn import main``) runs ``__init__`` then,
through the package's module ``__getattr__`` (PEP 562), so code elsewhere in the
worker sees uvicorn as usual.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from typing import Any

_COMPLETING = threading.Lock()


def config_and_server() -> tuple[type, type]:
    """``uvicorn.Config`` and ``uvicorn.Server``."""
    if "uvicorn" not in sys.modules:
        _register_uninitialized()
    from uvicorn.config import Config
    from uvicorn.server import Server

    package = sys.modules["uvicorn"]
    # names its submodules import from the package (uvicorn.lifespan: `from uvicorn import Config`)
    package.Config, package.Server = Config, Server
    return Config, Server


def _register_uninitialized() -> None:
    spec = importlib.util.find_spec("uvicorn")
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")
    package = importlib.util.module_from_spec(spec)

    def run_init_then_get(name: str) -> Any:
        with _COMPLETING:
            if vars(package).pop("__getattr__", None) is not None:
                spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = run_init_then_get
    sys.modules["uvicorn"] = package
