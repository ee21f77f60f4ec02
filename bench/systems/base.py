"""The System interface: one process model serving the hello world on host:port.

A system is started with start(workers) and measured through this interface only, so adding
one (clusterkit's `clusterkit-shared` and `clusterkit-reuseport`, under systemd in a
systemd-nspawn container) means writing one subclass and listing it in bench/systems/__init__.py.

Contract, all times in seconds, all pids host pids (what /proc on the host shows):

- start(workers) -> float: launch with `workers` workers, return the time from the start command
  until every worker has served a request (self.wait_serving does that by attribution).
- pids() -> list[int]: every process of the setup (primary/master/daemon included): memory is the
  sum of their PSS.
- worker_pids() -> list[int]: the processes that accept and serve connections.
- kill_one_worker(pid=None) -> int: SIGKILL worker *pid* (default: one of them), return its pid
  (do not wait).
- rolling_reload() -> None: the tool's zero-downtime reload; return once every worker has been
  replaced (or raise NotSupported).
- restart_all() -> None: restart every worker at once; return once they are all back.
- stop() -> None: stop everything started; must be idempotent and safe to call at any time.
- respawns: whether the setup replaces a killed worker by itself.
- netns_pid: None, or a pid whose network namespace the load generators must join (wrk is run
  as `nsenter -t PID -n wrk …`, the Python client threads call setns()).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from bench import procfs
from bench.client import SockDiag, attributed_request, run_in_netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/
WORK = os.path.join(ROOT, "work")
NPROC = os.cpu_count() or 1


class NotSupported(Exception):
    """The system has no such operation (reported as n/a)."""


class StartTimeout(Exception):
    pass


class Registry:
    """Every process the harness started or saw as part of a system, for cleanup on exit."""

    def __init__(self) -> None:
        self.procs: dict[int, int | None] = {}
        self.groups: set[int] = set()

    def note(self, pids: list[int]) -> None:
        for pid in pids:
            if pid not in self.procs:
                self.procs[pid] = procfs.starttime(pid)

    def note_group(self, pgid: int) -> None:
        self.groups.add(pgid)

    def kill_all(self) -> None:
        for pgid in self.groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
        for pid, start in self.procs.items():
            if start is not None and procfs.alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


REGISTRY = Registry()


def wait_dead(starts: dict[int, int | None], timeout: float = 5.0) -> None:
    """Wait until every (pid, starttime) has exited (a zombie counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(s is not None and procfs.alive(p, s) for p, s in starts.items()):
            return
        time.sleep(0.01)


class System:
    name = "system"
    host = "127.0.0.1"
    port = 3000
    respawns = True
    netns_pid: int | None = None
    description = ""

    @property
    def summary(self) -> str:
        """What it runs, before it has run (a reference's line in RESULTS.md)."""
        return self.description

    def __init__(self) -> None:
        self.workers = 0
        self.commands: dict[str, str] = {}  # operation -> exact command, for RESULTS.md

    # --- to implement -------------------------------------------------------------------
    def start(self, workers: int) -> float:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        raise NotImplementedError

    def kill_one_worker(self, pid: int | None = None) -> int:
        pid = self.worker_pids()[0] if pid is None else pid
        os.kill(pid, signal.SIGKILL)
        return pid

    def rolling_reload(self) -> None:
        raise NotSupported

    def restart_all(self) -> None:
        raise NotSupported

    def stop(self) -> None:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        return {}

    def memory_not_counted(self) -> dict[str, float]:
        """PSS in MiB of processes that run alongside but are not counted in pids() (by name)."""
        return {}

    # --- helpers ------------------------------------------------------------------------
    def load_prefix(self) -> list[str]:
        """argv prefix for load generators (wrk) so they run in the system's network namespace."""
        return [] if self.netns_pid is None else ["nsenter", "-t", str(self.netns_pid), "-n"]

    def note(self) -> None:
        REGISTRY.note(self.pids())

    def wait_serving(self, t0: float, timeout: float = 30.0) -> float:
        """Send requests (each on a new connection) until every worker has served one.

        Returns seconds since t0. Use only while nothing else loads the system.
        """

        def probe() -> float:
            diag = SockDiag()
            served: set[int] = set()
            deadline = time.monotonic() + timeout
            try:
                while time.monotonic() < deadline:
                    workers = self.worker_pids()
                    REGISTRY.note(workers)
                    if len(workers) == self.workers and set(workers) <= served:
                        return time.monotonic() - t0
                    pid, fail = attributed_request(
                        self.host, self.port, self.worker_pids, diag, 1.0
                    )
                    if pid is not None and fail is None:
                        served.add(pid)
                    elif fail:
                        time.sleep(0.002)
            finally:
                diag.close()
            raise StartTimeout(
                f"{self.name}: not every worker served within {timeout}s "
                f"(workers {self.worker_pids()}, served {sorted(served)})"
            )

        result = run_in_netns(self.netns_pid, probe)
        self.note()
        return result  # type: ignore[return-value]

    def wait_workers(self, old: set[int], timeout: float = 8.0) -> float:
        """Wait until there are self.workers workers, none of them in `old`, and every pid in
        `old` has exited. Returns the seconds waited (used while a load runs)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            w = self.worker_pids()
            gone = not any(procfs.alive(p) for p in old)
            if len(w) == self.workers and not (set(w) & old) and gone:
                REGISTRY.note(self.pids())
                return time.monotonic() - t0
            time.sleep(0.01)
        raise TimeoutError(f"{self.name}: workers not replaced within {timeout}s")


class ProcessSystem(System):
    """A system whose primary is one process the harness starts in its own process group."""

    def __init__(self) -> None:
        super().__init__()
        self.proc: subprocess.Popen | None = None
        self.log = None

    def argv(self, workers: int) -> list[str]:
        raise NotImplementedError

    def env(self, workers: int) -> dict[str, str]:
        return dict(os.environ)

    cwd = ROOT

    def launch(self, workers: int) -> None:
        self.workers = workers
        os.makedirs(WORK, exist_ok=True)
        self.log = open(os.path.join(WORK, f"{self.name}.log"), "ab")
        argv = self.argv(workers)
        self.commands.setdefault("start", " ".join(argv))
        self.proc = subprocess.Popen(
            argv,
            cwd=self.cwd,
            env=self.env(workers),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        REGISTRY.note([self.proc.pid])
        REGISTRY.note_group(self.proc.pid)

    def start(self, workers: int) -> float:
        t0 = time.monotonic()
        self.launch(workers)
        return self.wait_serving(t0)

    def master_pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def pids(self) -> list[int]:
        m = self.master_pid()
        return [m, *procfs.descendants(m)] if m else []

    def worker_pids(self) -> list[int]:
        m = self.master_pid()
        return procfs.children(m) if m else []

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid
        pids = self.pids()
        REGISTRY.note(pids)
        starts = {p: procfs.starttime(p) for p in pids}
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        for p, s in starts.items():  # anything that left the group
            if s is not None and procfs.alive(p, s):
                os.kill(p, signal.SIGKILL)
        wait_dead(starts)
        self.proc = None
        if self.log:
            self.log.close()
            self.log = None
