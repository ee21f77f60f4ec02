"""Node's cluster module (the seed's hello world, verbatim) and pm2 in cluster mode."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

from bench import procfs
from bench.systems.base import (
    NPROC,
    REGISTRY,
    WORK,
    NotSupported,
    ProcessSystem,
    System,
    wait_dead,
)

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
NODE = shutil.which("node") or "/usr/bin/node"


def node_version() -> str:
    return subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout.strip()


class NodeCluster(ProcessSystem):
    """`node cluster.js`: the primary forks os.cpus().length workers that listen(3000).

    The seed's primary only logs a worker's exit: a killed worker is not replaced, and there is
    no reload. restart_all() therefore restarts the whole program (the port closes meanwhile).
    """

    respawns = False
    cwd = NODE_DIR

    def __init__(self, policy: str) -> None:
        super().__init__()
        self.policy = policy
        self.name = f"node-cluster-{policy}"
        self.description = f"seed's cluster.js verbatim, NODE_CLUSTER_SCHED_POLICY={policy}" + (
            " (the default)" if policy == "rr" else ""
        )

    def argv(self, workers: int) -> list[str]:
        if workers == NPROC:
            return [NODE, "cluster.js"]
        # cluster.js forks os.cpus().length workers; workers.js trims os.cpus() to BENCH_WORKERS
        return [NODE, "-r", "./workers.js", "cluster.js"]

    def env(self, workers: int) -> dict[str, str]:
        env = dict(os.environ, NODE_CLUSTER_SCHED_POLICY=self.policy)
        if workers != NPROC:
            env["BENCH_WORKERS"] = str(workers)
        return env

    def launch(self, workers: int) -> None:
        self.commands.setdefault(
            "start", f"NODE_CLUSTER_SCHED_POLICY={self.policy} " + " ".join(self.argv(workers))
        )
        super().launch(workers)

    def rolling_reload(self) -> None:
        raise NotSupported("the seed's cluster.js has no reload")

    def restart_all(self) -> None:
        old = set(self.worker_pids())
        n = self.workers
        self.commands["restart_all"] = "kill -TERM <primary>; node cluster.js"
        self.stop()
        self.launch(n)
        self.wait_workers(old)

    def versions(self) -> dict[str, str]:
        return {"node": node_version()}


class Pm2(System):
    """`pm2 start server.js -i max`, pm2 installed from npm into bench/work/npm.

    PM2_HOME is a fresh directory under bench/work per start, so the start time includes
    starting pm2's God daemon (what a first `pm2 start` does). Workers are the daemon's
    children (pm2's cluster mode is Node's cluster module with the daemon as primary).
    """

    name = "pm2"
    description = "pm2 cluster mode, `pm2 start server.js -i max`"
    app = "hello"

    def __init__(self) -> None:
        super().__init__()
        self.prefix = os.path.join(WORK, "npm")
        self.pm2 = os.path.join(self.prefix, "node_modules", ".bin", "pm2")
        self.home = os.path.join(WORK, "pm2-home")
        self.started = False

    def ensure_installed(self) -> None:
        if not os.path.exists(self.pm2):
            os.makedirs(self.prefix, exist_ok=True)
            subprocess.run(
                ["npm", "install", "--prefix", self.prefix, "pm2", "--no-audit", "--no-fund"],
                check=True,
                stdout=subprocess.DEVNULL,
            )

    def _env(self) -> dict[str, str]:
        return dict(os.environ, PM2_HOME=self.home)

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.pm2, *args],
            cwd=NODE_DIR,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def daemon_pid(self) -> int | None:
        try:
            with open(os.path.join(self.home, "pm2.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        return pid if procfs.alive(pid) else None

    def start(self, workers: int) -> float:
        self.ensure_installed()
        shutil.rmtree(self.home, ignore_errors=True)
        os.makedirs(self.home)
        self.workers = workers
        count = "max" if workers == NPROC else str(workers)
        args = ["start", "server.js", "-i", count, "--name", self.app]
        self.commands.setdefault("start", "pm2 " + " ".join(args))
        t0 = time.monotonic()
        self.started = True
        r = self.run(*args)
        REGISTRY.note(self.pids())
        if r.returncode != 0:
            raise RuntimeError(f"pm2 start failed: {r.stderr or r.stdout}")
        return self.wait_serving(t0)

    def pids(self) -> list[int]:
        d = self.daemon_pid()
        return [d, *procfs.descendants(d)] if d else []

    def worker_pids(self) -> list[int]:
        d = self.daemon_pid()
        return procfs.children(d) if d else []

    def rolling_reload(self) -> None:
        old = set(self.worker_pids())
        self.commands["rolling_reload"] = f"pm2 reload {self.app}"
        r = self.run("reload", self.app)
        if r.returncode != 0:
            raise RuntimeError(f"pm2 reload failed: {r.stderr}")
        self.wait_workers(old)

    def restart_all(self) -> None:
        old = set(self.worker_pids())
        self.commands["restart_all"] = f"pm2 restart {self.app}"
        r = self.run("restart", self.app)
        if r.returncode != 0:
            raise RuntimeError(f"pm2 restart failed: {r.stderr}")
        self.wait_workers(old)

    def stop(self) -> None:
        if not self.started:
            return
        pids = self.pids()
        REGISTRY.note(pids)
        starts = {p: procfs.starttime(p) for p in pids}
        try:
            self.run("kill", timeout=15)
        except subprocess.TimeoutExpired:
            pass
        for p, s in starts.items():
            if s is not None and procfs.alive(p, s):
                os.kill(p, signal.SIGKILL)
        wait_dead(starts)
        self.started = False

    def versions(self) -> dict[str, str]:
        try:
            with open(os.path.join(self.prefix, "node_modules", "pm2", "package.json")) as f:
                v = json.load(f)["version"]
        except OSError:
            v = "?"
        return {"pm2": v, "node": node_version()}
