"""gunicorn -w N (WSGI) and uvicorn --workers N (ASGI), serving bench/systems/python/app.py."""

from __future__ import annotations

import os
import signal
import sys

from bench import procfs
from bench.systems.base import ProcessSystem

APP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python")
BIN = os.path.dirname(sys.executable)


class _Supervised(ProcessSystem):
    """A master process that keeps the listening socket and respawns dead workers."""

    single_process = False  # True: with 1 worker the program serves in its own process

    def worker_pids(self) -> list[int]:
        m = self.master_pid()
        if not m:
            return []
        if self.workers == 1 and self.single_process:
            return [m]
        # multiprocessing's helper processes (uvicorn uses the spawn context) are not workers
        return [p for p in procfs.children(m) if "resource_tracker" not in procfs.cmdline(p)]

    def restart_all(self) -> None:
        """SIGTERM every worker at once; the master keeps the socket and starts new ones."""
        old = set(self.worker_pids())
        self.commands["restart_all"] = "kill -TERM <every worker pid> (the master respawns them)"
        for pid in old:
            os.kill(pid, signal.SIGTERM)
        self.wait_workers(old)

    def rolling_reload(self) -> None:
        old = set(self.worker_pids())
        self.commands["rolling_reload"] = "kill -HUP <master>"
        os.kill(self.master_pid(), signal.SIGHUP)
        self.wait_workers(old)


class Gunicorn(_Supervised):
    """gunicorn's default (sync) worker: one request at a time, and it closes every connection
    after the response (no keep-alive). SIGHUP: the master starts N new workers, then stops the
    old ones gracefully."""

    name = "gunicorn"
    description = "gunicorn -w N, default sync worker, WSGI hello world"

    def argv(self, workers: int) -> list[str]:
        return [
            os.path.join(BIN, "gunicorn"),
            "-w",
            str(workers),
            "-b",
            f"{self.host}:{self.port}",
            "--chdir",
            APP_DIR,
            "app:wsgi",
        ]

    def versions(self) -> dict[str, str]:
        import gunicorn

        return {"gunicorn": gunicorn.__version__}


class Uvicorn(_Supervised):
    """uvicorn's multiprocess supervisor; uvloop and httptools are installed, so `auto` picks
    them. Access logging is off (Node logs nothing per request). SIGHUP (uvicorn >= 0.2x, checked
    in 0.54's supervisors/multiprocess.py): for each worker in turn, start a new one, wait until it
    answers the supervisor's readiness ping, then SIGTERM the old one: a rolling restart."""

    name = "uvicorn"
    single_process = True  # `uvicorn --workers 1` runs no supervisor
    description = "uvicorn --workers N --http httptools, ASGI hello world, uvloop"

    def argv(self, workers: int) -> list[str]:
        return [
            os.path.join(BIN, "uvicorn"),
            "--workers",
            str(workers),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--app-dir",
            APP_DIR,
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
            "app:asgi",
        ]

    def versions(self) -> dict[str, str]:
        import httptools
        import uvicorn
        import uvloop

        return {
            "uvicorn": uvicorn.__version__,
            "uvloop": uvloop.__version__,
            "httptools": httptools.__version__,
        }


class GunicornUvicorn(Gunicorn):
    """gunicorn's master with uvicorn's worker class (`uvicorn.workers.UvicornWorker`, loop and
    http "auto": uvloop and httptools), the same ASGI app as `uvicorn` and `clusterkit-asgi`.
    uvicorn 0.3x marks the module deprecated in favour of the `uvicorn-worker` package; it
    still ships and works."""

    name = "gunicorn-uvicorn"
    description = "gunicorn -w N -k uvicorn.workers.UvicornWorker, ASGI hello world, httptools"

    def argv(self, workers: int) -> list[str]:
        argv = super().argv(workers)
        return [*argv[:-1], "-k", "uvicorn.workers.UvicornWorker", "app:asgi"]

    def versions(self) -> dict[str, str]:
        import gunicorn
        import uvicorn

        return {"gunicorn": gunicorn.__version__, "uvicorn": uvicorn.__version__}
