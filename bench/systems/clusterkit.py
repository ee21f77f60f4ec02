"""clusterkit under real systemd: `clusterkit-shared` and `clusterkit-reuseport`.

Each start boots a throwaway systemd 252 (clusterkit.container: systemd-nspawn, private
network, the checkout bound at its own path so the venv runs inside), renders the units with
`clusterkit generate` (the defaults users get: RestartSec=0 and the crash-loop back-off),
installs them and runs `systemctl start NAME.target`. The workers are
bench/systems/python/clusterkit_hello.py: `serve_asyncio` (uvloop + httptools), clusterkit's
fastest serving path.

Everything is measured from the host: wrk and the Python client join the container's network
namespace (netns_pid = its PID 1), and pids are host pids. A worker's host pid is read from its
unit's cgroup (cgroup.procs lists pids in the *reader's* pid namespace), keeping the process
that runs the worker script (the unit's MainPID; the ExecStop= shell shares the cgroup
for a moment at a requested stop).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procfs
from bench.systems.base import REGISTRY, WORK, System

APP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python")
HELLO = os.path.join(APP_DIR, "clusterkit_hello.py")
PY = sys.executable  # the checkout's venv, bound at the same path inside the container
CLUSTERKIT = os.path.join(os.path.dirname(PY), "clusterkit")
GUNICORN = os.path.join(os.path.dirname(PY), "gunicorn")
#: what the workers run, by kind: (worker script or None, description)
KINDS = {
    "asyncio": (HELLO, "workers on `serve_asyncio` (uvloop + httptools)"),
    "asgi": (
        os.path.join(APP_DIR, "clusterkit_asgi.py"),
        'workers on `serve_asgi` (uvicorn, `http="httptools"`, uvloop), the ASGI app '
        "`uvicorn --workers N` serves, with clusterkit's request limits "
        "(`clusterkit.asgiprotocols` in uvicorn's protocol, `clusterkit.asgilimits` before "
        "the app), which `uvicorn --workers N` does not have",
    ),
    "wsgi": (
        os.path.join(APP_DIR, "clusterkit_wsgi.py"),
        "workers on `serve_wsgi` (waitress), the WSGI app `gunicorn -w N` serves",
    ),
    "floor": (
        os.path.join(APP_DIR, "clusterkit_floor.py"),
        "workers on the floor protocol (`bench/systems/python/clusterkit_floor.py`: uvloop + "
        "httptools and a fixed response, no limits, timeouts, Request or handler), the most "
        "any Python server on uvloop and httptools can serve here: a reference, not a server "
        "to deploy, measured only in the interleaved groups",
    ),
    "gunicorn": (
        None,
        "each unit runs stock `gunicorn --workers 1 app:wsgi` (sync worker, `Type=notify`: "
        "gunicorn sends READY=1), the app and server `gunicorn -w N` runs",
    ),
}
UNIT_NAME = "hello"
#: processes of the container that are not counted in memory but reported apart (by comm)
NOT_COUNTED = ("systemd-journal", "dbus-daemon", "systemd-logind")


class Clusterkit(System):
    """A clusterkit cluster of `workers` instances of hello@.service, systemd as the primary.

    Memory (pids()) counts the workers and the container's PID 1 (systemd, the primary here;
    on a server it runs anyway). journald, dbus-daemon and logind run in the container too;
    they are not counted, their PSS is reported apart (memory_not_counted()).
    """

    def __init__(
        self, scheduling: str, restart_sec: float | None = None, kind: str = "asyncio"
    ) -> None:
        super().__init__()
        self.scheduling = scheduling
        self.restart_sec = restart_sec
        self.kind = kind
        self.script, self.serving = KINDS[kind]
        self.name = f"clusterkit-{scheduling}" if kind == "asyncio" else f"clusterkit-{kind}"
        if kind != "asyncio" and scheduling != "shared":
            self.name += f"-{scheduling}"
        self.box = None  # clusterkit.container.Container, once booted
        self.boot_s: float | None = None
        self._cgroup_base: Path | None = None

    @property
    def summary(self) -> str:
        return (
            f"clusterkit `--scheduling {self.scheduling}` under systemd (systemd-nspawn, private "
            f"network; load generators join its network namespace), {self.serving}"
        )

    @property
    def description(self) -> str:  # type: ignore[override]
        boot = f"{self.boot_s:.2f} s" if self.boot_s is not None else "not measured"
        return (
            f"{self.summary}. Memory counts the workers + the container's PID 1 (systemd, "
            "the primary); journald, dbus-daemon and logind are reported apart. Container boot "
            f"(not part of the start time): {boot}"
        )

    # --- setup ---------------------------------------------------------------------------
    def exec_line(self) -> str:
        if self.script is None:  # stock gunicorn, one worker process per unit
            return f"{GUNICORN} --workers 1 --chdir {APP_DIR} app:wsgi"
        return f"{PY} {self.script}"

    def generate_argv(self, workers: int, out: str) -> list[str]:
        argv = [
            CLUSTERKIT,
            "generate",
            "--name",
            UNIT_NAME,
            "--exec",
            self.exec_line(),
            "--workers",
            str(workers),
            "--listen",
            str(self.port),
            "--scheduling",
            self.scheduling,
            "--output",
            out,
        ]
        if self.restart_sec is not None:
            argv += ["--restart-sec", f"{self.restart_sec:g}"]
        return argv

    def render(self, workers: int) -> list[Path]:
        """`clusterkit generate` into bench/work/NAME-units (cwd: an empty dir, so no
        pyproject.toml's [tool.clusterkit] is merged)."""
        out = os.path.join(WORK, f"{self.name}-units")
        os.makedirs(WORK, exist_ok=True)
        for old in Path(out).glob("*"):
            old.unlink()
        argv = self.generate_argv(workers, out)
        with tempfile.TemporaryDirectory(prefix="bench-ck-") as cwd:
            subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True)
        self.commands.setdefault(
            "generate", shlex.join([*argv[:-1], "DIR"]).replace(CLUSTERKIT, "clusterkit")
        )
        return sorted(Path(out).iterdir())

    def boot(self) -> None:
        from clusterkit.container import Container

        self.box = Container(name=f"bench-{self.name}-{os.urandom(3).hex()}")
        t0 = time.monotonic()
        self.box.start()
        self.boot_s = time.monotonic() - t0
        self.netns_pid = self.box.pid
        REGISTRY.note([self.box.pid])
        self.commands.setdefault(
            "container",
            "Container(private_network=True).start(): " + shlex.join(self.box.nspawn_argv()),
        )

    def install(self, workers: int) -> None:
        """Render the units for `workers`, boot the container and install them (nothing started)."""
        self.workers = workers
        units = self.render(workers)
        self.boot()
        self.box.install_units(units)
        self._cgroup_base = self._find_cgroup_base()

    def start(self, workers: int) -> float:
        """Boot the container (not timed), install the units, then time
        `systemctl start NAME.target` until every worker has served a request."""
        self.install(workers)
        self.commands.setdefault("start", f"systemctl start {UNIT_NAME}.target")
        t0 = time.monotonic()
        self.box.systemctl("start", f"{UNIT_NAME}.target")
        return self.wait_serving(t0)

    def _find_cgroup_base(self) -> Path:
        """The container's system.slice as seen through /proc/PID/root (hybrid or pure v2)."""
        root = Path(f"/proc/{self.box.pid}/root/sys/fs/cgroup")
        for base in (root / "unified" / "system.slice", root / "system.slice"):
            if (base / "cgroup.procs").exists():
                return base
        raise RuntimeError(f"{self.name}: no system.slice under {root}")

    # --- processes -----------------------------------------------------------------------
    def _unit_procs(self, k: int) -> list[int]:
        assert self._cgroup_base is not None
        path = self._cgroup_base / f"system-{UNIT_NAME}.slice" / f"{UNIT_NAME}@{k}.service"
        try:
            return [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def worker_pids(self) -> list[int]:
        """Host pids of the MainPIDs of hello@0..N-1.service: the process in each unit's cgroup
        that runs the worker script (before exec a forked child still runs systemd's code)."""
        if self.box is None or not self.box.pid or self._cgroup_base is None:
            return []
        out = []
        for k in range(self.workers):
            procs = self._unit_procs(k)
            for pid in procs:
                if self._serves(pid, procs) and procfs.alive(pid):
                    out.append(pid)
        return out

    def _serves(self, pid: int, procs: list[int]) -> bool:
        """The worker script itself; for stock gunicorn, the arbiter's child (the sync worker
        that accepts), not the arbiter (the unit's MainPID)."""
        if self.script is not None:
            return procfs.cmdline(pid).endswith(self.script)
        return GUNICORN in procfs.cmdline(pid) and procfs.ppid(pid) in procs

    def _by_comm(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        if self.box is None or not self.box.pid:
            return out
        for pid in procfs.children(self.box.pid):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    out.setdefault(f.read().strip(), []).append(pid)
            except OSError:
                pass
        return out

    def pids(self) -> list[int]:
        """The workers and the container's PID 1 (systemd, the primary)."""
        if self.box is None or not self.box.pid:
            return []
        return [self.box.pid, *self.worker_pids()]

    def memory_not_counted(self) -> dict[str, float]:
        """PSS (MiB) of the container's other processes, reported apart."""
        comms = self._by_comm()
        return {
            c: sum(procfs.pss_kib(p) for p in comms.get(c, [])) / 1024
            for c in NOT_COUNTED
            if c in comms
        }

    def verify_pids(self) -> list[tuple[int, int]]:
        """(MainPID inside, host pid) per worker, checked against NSpid in /proc/PID/status:
        raises if the cgroup-derived host pids are not systemd's MainPIDs."""
        inside = []
        for k in range(self.workers):
            r = self.box.systemctl("show", "-p", "MainPID", "--value", f"{UNIT_NAME}@{k}.service")
            inside.append(int(r.stdout.strip()))
        pairs = []
        for host in self.worker_pids():
            with open(f"/proc/{host}/status") as f:
                nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
            pairs.append((int(nspid[-1]), host))
        if sorted(p for p, _ in pairs) != sorted(inside):
            raise RuntimeError(f"{self.name}: MainPIDs {inside} != cgroup pids {pairs}")
        return pairs

    # --- operations ----------------------------------------------------------------------
    def rolling_reload(self) -> None:
        old = set(self.worker_pids())
        self.commands["rolling_reload"] = f"clusterkit reload {UNIT_NAME}"
        r = self.box.run(PY, "-m", "clusterkit.cli", "reload", UNIT_NAME, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"clusterkit reload failed: {r.stderr or r.stdout}")
        self.wait_workers(old)

    def restart_all(self) -> None:
        old = set(self.worker_pids())
        glob = f"{UNIT_NAME}@*.service"
        self.commands["restart_all"] = f"systemctl restart '{glob}'"
        self.box.systemctl("restart", glob)
        self.wait_workers(old)

    # --- crash loop ----------------------------------------------------------------------
    CRASH_DROPIN = "/run/systemd/system/{unit}.service.d/bench-crash-loop.conf"

    def start_crash_loop(self, k: int = 0) -> float:
        """From now on worker k fails at every start (a drop-in points its Python at a home
        that does not exist, as a broken deploy would: the interpreter exits 1 before the
        worker script runs), then SIGTERM it: it drains and exits 0, and
        `Restart=always` starts it again, into the loop. (Not SIGKILL: the requests a kill cuts
        are counted under SIGKILL; what fails here is the crash loop's doing.) Returns the
        signal's wall-clock time."""
        unit = f"{UNIT_NAME}@{k}"
        self.box.write_file(
            self.CRASH_DROPIN.format(unit=unit), "[Service]\nEnvironment=PYTHONHOME=/nonexistent\n"
        )
        self.box.systemctl("daemon-reload")
        self.commands["crash_loop"] = (
            f"drop-in Environment=PYTHONHOME=/nonexistent for {unit}.service, then "
            f"systemctl kill -s TERM --kill-whom=main {unit}.service"
        )
        t0 = time.time()
        self.box.systemctl("kill", "-s", "TERM", "--kill-whom=main", f"{unit}.service")
        return t0

    def crash_loop_record(self, since: float, k: int = 0) -> dict:
        """What PID 1 did with worker k since `since`: when it started it (its "Starting"
        records), and the state of the worker and of its socket now."""
        from clusterkit import names, report

        unit = f"{UNIT_NAME}@{k}.service"
        r = self.box.run(
            "journalctl", "-o", "json", "--no-pager", f"--since=@{since:.6f}",
            "_PID=1", f"UNIT={unit}", f"MESSAGE_ID={report.STARTING}",
        )  # fmt: skip
        starts = [
            int(json.loads(line)["__REALTIME_TIMESTAMP"]) / 1e6 - since
            for line in r.stdout.splitlines()
        ]
        sock = names.socket(UNIT_NAME, self.scheduling, k)
        state = {}
        for u in (unit, sock):
            r = self.box.systemctl("show", "-P", "ActiveState", u)
            state[u] = r.stdout.strip()
        return {"starts_s": starts, "worker_state": state[unit], "socket_state": state[sock]}

    def end_crash_loop(self, k: int = 0) -> None:
        """Remove the drop-in and bring worker k back (its socket too, if the start limit
        failed it)."""
        unit = f"{UNIT_NAME}@{k}"
        self.box.run("rm", "-f", self.CRASH_DROPIN.format(unit=unit))
        self.box.systemctl("daemon-reload")
        from clusterkit import names

        sock = names.socket(UNIT_NAME, self.scheduling, k)
        self.box.systemctl("reset-failed", f"{unit}.service", sock)
        # start: a no-op for the shared socket, which must stay open for the other workers
        self.box.systemctl("start", sock)
        self.box.systemctl("restart", f"{unit}.service")
        self.wait_workers(set())

    def stop(self) -> None:
        """Power the container off (idempotent; also after a failed or interrupted start)."""
        box, self.box = self.box, None
        if box is not None:
            box.poweroff()
        self.netns_pid = None
        self._cgroup_base = None

    def versions(self) -> dict[str, str]:
        import gunicorn
        import httptools
        import uvicorn
        import uvloop
        import waitress

        import clusterkit

        first = subprocess.run(["systemctl", "--version"], capture_output=True, text=True)
        return {
            "clusterkit": clusterkit.__version__,
            "systemd": first.stdout.split("\n")[0].removeprefix("systemd "),
            "python (clusterkit workers)": platform.python_version(),
            "uvloop": uvloop.__version__,
            "httptools": httptools.__version__,
            **{
                "asgi": {"uvicorn": uvicorn.__version__},
                "wsgi": {"waitress": getattr(waitress, "__version__", "installed")},
                "gunicorn": {"gunicorn": gunicorn.__version__},
            }.get(self.kind, {}),
        }
