"""The primary's side of Node's cluster API, with systemd doing the work.

``from clusterkit import cluster`` re-exports these names lazily (a worker
never imports this module). systemd is the real primary: it forks, restarts and
holds the port; this module asks it (``systemctl``) and listens to it (the
journal, :mod:`clusterkit.events`)::

    from clusterkit import cluster
    cluster.setup_primary(name="hello")
    cluster.on("exit", lambda w, code, sig: print(f"worker {w.process.pid} died"))
    cluster.run()          # Node's event loop keeps its primary alive; here, say so

Mapping (DESIGN.md): ``fork()`` is ``systemctl start NAME@K.service`` for the
lowest free K; ``worker.kill(sig)`` is ``systemctl kill --signal=SIG``;
``worker.disconnect()`` is ``systemctl stop`` (SIGTERM, drain, exit 0), and in
reuseport mode also stops ``NAME@K.socket``, whose queue would otherwise hold
connections for a worker that never comes back. Node's ``kill()`` disconnects
first and so sets ``exitedAfterDisconnect``; ``systemctl kill`` does not.

Nothing here is persistent: ``fork``/``disconnect``/``scale`` change the running
system only; ``NAME.target`` still starts the generated number of workers at boot.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from clusterkit import events as _events
from clusterkit import manifest, names, unitfiles
from clusterkit.manager import Manager, ManagerError, find
from clusterkit.spec import Spec, SpecError, batch_size, check_name, check_worker_count, parse_env

_SHOW = (
    "Id",
    "ActiveState",
    "SubState",
    "MainPID",
    "InvocationID",
    "NRestarts",
    "Type",
    "Job",
    "ExecMainStartTimestampMonotonic",
)


class PrimaryError(ManagerError):
    """No such cluster, or systemd refused; the message says what to do."""


@dataclass
class Settings:
    """Node's ``cluster.settings``: the cluster, its service manager, and its spec.

    The spec comes from the manifest ``install`` put beside the units
    (``NAME.clusterkit.json``), so the primary knows what it manages without
    reading unit text; None for units installed without one.
    """

    name: str
    manager: Manager = field(default_factory=Manager)
    spec: Spec | None = None

    @property
    def user(self) -> bool:
        return self.manager.user

    # Node's names for what the spec says
    @property
    def exec(self) -> str | None:
        return self.spec.exec[0] if self.spec else None

    @property
    def args(self) -> list[str]:
        return list(self.spec.exec[1:]) if self.spec else []

    @property
    def cwd(self) -> str | None:
        return self.spec.working_directory if self.spec else None

    @property
    def uid(self) -> str | None:
        """The workers' user (``--run-as``); None: a dynamic user, or unknown."""
        return self.spec.run_as if self.spec else None

    @property
    def gid(self) -> str | None:
        return self.spec.group if self.spec else None

    @property
    def env(self) -> dict[str, str]:
        return dict(self.spec.env) if self.spec else {}

    @property
    def workers(self) -> int | None:
        """The generated worker count; None for auto (one per CPU) or unknown."""
        return self.spec.workers if self.spec else None


def installed_spec(name: str, manager: Manager) -> Spec | None:
    """The spec of cluster ``name`` from its manifest beside the units, if there is one."""
    for runtime in (True, False):  # /run first: it overrides /etc, as for systemd
        where = Manager(manager.scope, runtime=runtime, container_pid=manager.container_pid)
        path = where.unit_dir / manifest.file_name(name)
        if unitfiles.is_ours(path):
            try:
                return manifest.loads(path.read_text(encoding="utf-8"), str(path))
            except (OSError, SpecError):
                return None
    return None


_settings: Settings | None = None
_handlers: dict[str, list[Callable[..., Any]]] = {e: [] for e in _events.EVENTS}


def _name_from_pyproject(path: Path = Path("pyproject.toml")) -> str | None:
    if not path.is_file():
        return None
    from clusterkit import trust
    from clusterkit.spec import load_config

    reason = trust.why_untrusted(path) if trust.as_root() else None
    if reason is not None:  # as the CLI: the app's file would choose root's cluster
        raise PrimaryError(
            f"./pyproject.toml: not read, {reason}: root takes configuration only from "
            "root's files; call setup_primary(name=...) or set CLUSTERKIT_NAME"
        )

    name = load_config(path).get("name")
    return name if isinstance(name, str) else None


def setup_primary(
    name: str | None = None, *, user: bool | None = None, manager: Manager | None = None
) -> Settings:
    """Choose the cluster: ``name``, else ``$CLUSTERKIT_NAME``, else ./pyproject.toml's."""
    global _settings
    name = name or os.environ.get("CLUSTERKIT_NAME") or _name_from_pyproject()
    if not name:
        raise PrimaryError(
            "no cluster name: call setup_primary(name=...), set CLUSTERKIT_NAME, "
            "or run where pyproject.toml has [tool.clusterkit] name"
        )
    try:
        check_name(name)
    except SpecError as e:
        raise PrimaryError(str(e)) from None
    if manager is None:  # installed on this host, else run by `clusterkit up`
        manager = find(name, user=bool(user)) or Manager("user" if user else "system")
    _settings = Settings(name, manager, installed_spec(name, manager))
    return _settings


# Node's spellings: setupPrimary, and the older setupMaster
setupPrimary = setup_master = setupMaster = setup_primary


def _current() -> Settings:
    return _settings or setup_primary()


# ---- systemd ---------------------------------------------------------------------


def systemctl(*args: str, settings: Settings | None = None, check: bool = True) -> str:
    """``systemctl ARGS`` for the cluster's manager; PrimaryError with systemd's words."""
    s = settings or _current()
    try:
        return s.manager.systemctl(*args, check=check)
    except ManagerError as e:
        raise PrimaryError(str(e)) from None


def _bounded(*args: str, units: list[str], settings: Settings, check: bool = True) -> None:
    """``systemctl start``, ``stop`` or ``restart`` of ``units`` that no worker can make wait
    for ever (:meth:`Manager.systemctl_bounded`: one that keeps delaying is killed)."""
    try:
        settings.manager.systemctl_bounded(*args, units=units, check=check)
    except ManagerError as e:
        raise PrimaryError(str(e)) from None


def _services(ids: Iterable[int], s: Settings) -> list[str]:
    return [names.service(s.name, i) for i in ids]


def _show(units: Iterable[str], props: tuple[str, ...], settings: Settings) -> list[dict[str, str]]:
    try:
        return settings.manager.show(units, props)
    except ManagerError as e:
        raise PrimaryError(str(e)) from None


def _instances(settings: Settings) -> list[str]:
    """NAME@K.service units systemd has loaded (running, starting, failed...)."""
    out = systemctl(
        "list-units",
        "--all",
        "--plain",
        "--no-legend",
        names.service(settings.name, "*"),  # type: ignore[arg-type]
        settings=settings,
    )
    units = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [u for u in units if names.worker_id(u, settings.name) is not None]


# ---- workers ---------------------------------------------------------------------


@dataclass
class Process:
    """Node's ``worker.process``: the main process of the current run."""

    pid: int | None
    _worker: Worker = field(repr=False)

    def kill(self, signal: str = "SIGTERM") -> None:
        self._worker.kill(signal)


@dataclass
class Worker:
    """One instance NAME@K.service, as systemd saw it when this object was made."""

    id: int
    pid: int | None = None
    state: str = "dead"  # starting | online | listening | disconnected | dead
    invocation_id: str | None = None
    uptime: float | None = None  # seconds since the main process started
    restarts: int = 0  # systemd's NRestarts (automatic restarts)
    exited_after_disconnect: bool | None = None
    systemd_state: str = ""  # ActiveState/SubState, e.g. "activating/auto-restart"
    settings: Settings = field(default_factory=_current, repr=False)

    @property
    def unit(self) -> str:
        return names.service(self.settings.name, self.id)

    @property
    def process(self) -> Process:
        return Process(self.pid, self)

    def is_dead(self) -> bool:
        return self.state == "dead"

    def is_connected(self) -> bool:
        return self.state in ("online", "listening")

    def refresh(self) -> Worker:
        """Re-read this worker's state from systemd."""
        fresh = _worker_from(_show([self.unit], _SHOW, self.settings)[0], self.settings)
        after = self.exited_after_disconnect
        self.__dict__.update(fresh.__dict__)
        self.exited_after_disconnect = after if fresh.exited_after_disconnect is None else True
        return self

    def kill(self, signal: str = "SIGTERM") -> None:
        """Send ``signal`` to the main process (``systemctl kill``); systemd restarts it."""
        sig = signal.upper().removeprefix("SIG")
        systemctl(
            "kill", "--kill-who=main", f"--signal=SIG{sig}", self.unit, settings=self.settings
        )

    def disconnect(self) -> None:
        """Graceful stop: SIGTERM, drain, exit; returns once it has exited."""
        stop = _with_socket([self.id], self.settings)
        _bounded("stop", *stop, units=[self.unit], settings=self.settings)
        self.exited_after_disconnect = True
        self.refresh()

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "unit": self.unit,
            "pid": self.pid,
            "state": self.state,
            "invocation_id": self.invocation_id,
            "uptime": None if self.uptime is None else round(self.uptime, 3),
            "restarts": self.restarts,
            "systemd_state": self.systemd_state,
        }

    @property
    def is_running(self) -> bool:
        """Taken: running, starting, stopping, or waiting to be restarted by systemd."""
        return bool(self.systemd_state) and not self.systemd_state.startswith(
            ("inactive/", "failed/")
        )


def _state(props: dict[str, str]) -> str:
    active, sub = props.get("ActiveState", ""), props.get("SubState", "")
    if active == "active":
        return "listening" if props.get("Type") == "notify" else "online"
    if active in ("activating", "reloading") and sub != "auto-restart":
        return "starting"
    if active == "deactivating" and props.get("Job"):
        return "disconnected"  # a stop was requested and is under way
    return "dead"


def _worker_from(props: dict[str, str], settings: Settings) -> Worker:
    worker_id = names.worker_id(props.get("Id"), settings.name)
    assert worker_id is not None, props
    state = _state(props)
    pid = int(props.get("MainPID") or 0) or None
    started = int(props.get("ExecMainStartTimestampMonotonic") or 0)
    uptime = time.monotonic() - started / 1e6 if started and pid else None
    return Worker(
        worker_id,
        pid=pid,
        state=state,
        invocation_id=props.get("InvocationID") or None,
        uptime=uptime,
        restarts=int(props.get("NRestarts") or 0),
        exited_after_disconnect=True if state == "disconnected" else None,
        systemd_state=f"{props.get('ActiveState', '')}/{props.get('SubState', '')}",
        settings=settings,
    )


def get_workers(settings: Settings | None = None) -> dict[int, Worker]:
    """Node's ``cluster.workers``: id -> Worker, as systemd sees them now."""
    s = settings or _current()
    found = [_worker_from(p, s) for p in _show(_instances(s), _SHOW, s)]
    return {w.id: w for w in sorted(found, key=lambda w: w.id)}


def scheduling(settings: Settings | None = None) -> str:
    """``shared`` or ``reuseport``: the spec's, else which socket starts worker 0."""
    s = settings or _current()
    if s.spec is not None:
        return s.spec.scheduling
    sockets = _show([names.service(s.name, 0)], ("TriggeredBy",), s)[0]["TriggeredBy"].split()
    return names.REUSEPORT if names.socket(s.name, names.REUSEPORT, 0) in sockets else names.SHARED


def _with_socket(ids: Iterable[int], s: Settings, reuseport: bool | None = None) -> list[str]:
    """The units of these workers: their services, and their sockets in reuseport mode."""
    ids = list(ids)
    if reuseport is None:
        reuseport = scheduling(s) == names.REUSEPORT
    units = [names.service(s.name, i) for i in ids]
    return units + ([names.socket(s.name, names.REUSEPORT, i) for i in ids] if reuseport else [])


def __getattr__(name: str) -> object:
    # Module attributes that must be read fresh from systemd each time.
    if name == "workers":
        return get_workers()
    if name == "settings":
        return _current()
    if name in ("scheduling_policy", "schedulingPolicy"):
        return scheduling()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- fork, disconnect, scale, reload ------------------------------------------------


def _dropin_dir(s: Settings, worker_id: int) -> Path:
    runtime = Manager(s.manager.scope, runtime=True, container_pid=s.manager.container_pid)
    return runtime.unit_dir / f"{names.service(s.name, worker_id)}.d"


def fork(
    env: Mapping[str, str] | Sequence[str] | None = None, *, settings: Settings | None = None
) -> Worker:
    """Start the lowest free instance; returns once it is started (READY=1).

    ``env`` goes into a runtime drop-in, ``/run/systemd/system/NAME@K.service.d/``
    ``50-clusterkit-fork.conf`` (gone at reboot; ``systemctl cat`` shows it). A
    fork without ``env`` removes the drop-in an earlier fork of K left.
    """
    s = settings or _current()
    busy = {w.id for w in get_workers(s).values() if w.is_running}
    worker_id = next(i for i in range(len(busy) + 1) if i not in busy)
    from clusterkit import render

    dropins = _dropin_dir(s, worker_id)
    if env:
        pairs = parse_env(env)  # the spec's rules for --env (SpecError: bad input)
        dropin = {render.FORK_DROPIN: render.fork_dropin(pairs)}
        unitfiles.write_all(dropins, dropin, force=True)
        systemctl("daemon-reload", settings=s)
    elif (dropins / render.FORK_DROPIN).exists():
        unitfiles.write_all(dropins, {}, stale=(render.FORK_DROPIN,))
        systemctl("daemon-reload", settings=s)
    _start([worker_id], s)
    return get_workers(s)[worker_id]


def _start(ids: list[int], s: Settings) -> None:
    units = list(reversed(_with_socket(ids, s)))  # each socket before its service
    # An instance that hit its start limit (reuseport mode) stays refused until reset.
    systemctl("reset-failed", *units, settings=s, check=False)
    _bounded("start", *units, units=_services(ids, s), settings=s)


def disconnect(callback: Callable[[], Any] | None = None, *, settings: Settings | None = None):
    """Gracefully stop every worker (and their sockets in reuseport mode), then ``callback()``."""
    s = settings or _current()
    ids = [w.id for w in get_workers(s).values() if w.is_running]
    if ids:
        _bounded("stop", *_with_socket(ids, s), units=_services(ids, s), settings=s)
    if callback is not None:
        callback()


def scale(count: int, *, settings: Settings | None = None) -> tuple[list[int], list[int]]:
    """Run workers 0..count-1 and stop the others; returns (started ids, stopped ids)."""
    s = settings or _current()
    check_worker_count(count, minimum=0)  # SpecError: bad input
    running = {w.id for w in get_workers(s).values() if w.is_running}
    start = [i for i in range(count) if i not in running]
    stop = sorted(i for i in running if i >= count)
    if stop:
        _bounded("stop", *_with_socket(stop, s), units=_services(stop, s), settings=s)
    if start:
        _start(start, s)
    return start, stop


def reload(
    progress: Callable[[Worker, Worker, int, int], Any] | None = None,
    *,
    batch: int | str = 1,
    settings: Settings | None = None,
) -> list[Worker]:
    """Rolling restart, ``batch`` workers at a time (a count, or "25%" of the running ones).

    ``systemctl restart`` of a batch returns once every new process has sent
    READY=1; only then does the next batch stop. PID 1 keeps the listening socket
    open meanwhile, so connections wait in its queue (or go to the other
    workers) and none is refused.
    """
    s = settings or _current()
    old = [w for w in get_workers(s).values() if w.is_running]
    size = batch_size(batch, len(old))
    done = []
    for start in range(0, len(old), size):
        chunk = old[start : start + size]
        units = [w.unit for w in chunk]
        _bounded("restart", *units, units=units, settings=s)
        fresh = get_workers(s)
        for n, w in enumerate(chunk, start + 1):
            new = fresh[w.id]
            if progress is not None:
                progress(w, new, n, len(old))
            done.append(new)
    return done


# ---- events ------------------------------------------------------------------------


def on(event: str, callback: Callable[..., Any]) -> None:
    """Node's ``cluster.on``: fork/online/disconnect(worker), listening(worker, address),
    exit(worker, code, signal). Dispatched by :func:`run`."""
    if event not in _handlers:
        raise ValueError(f"unknown event {event!r} (known: {', '.join(_events.EVENTS)})")
    _handlers[event].append(callback)


def _address(s: Settings) -> dict[str, object] | None:
    """Node's listening address: the spec's first, else the socket's (systemd's Listen)."""
    if s.spec is not None:
        listen = s.spec.listen[0].address
    else:
        sock = names.socket(s.name, scheduling(s), 0)
        listen = _show([sock], ("Listen",), s)[0]["Listen"].split(" ")[0]
    if listen.isascii() and listen.isdigit():  # a bare port: every address, as systemd says
        listen = f"[::]:{listen}"
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        return {"address": listen, "port": None, "addressType": -1} if listen else None
    host = host.strip("[]")
    return {"address": host, "port": int(port), "addressType": 6 if ":" in host else 4}


def dispatch(ev: _events.Event, s: Settings) -> None:
    """Call the handlers of one event with Node's arguments."""
    handlers = _handlers.get(ev.event, [])
    if not handlers:
        return
    w = Worker(ev.worker, pid=ev.pid, invocation_id=ev.invocation_id, settings=s)
    if ev.event == "exit":
        w.exited_after_disconnect = bool(ev.exited_after_disconnect)
        args: tuple[object, ...] = (w, ev.code, ev.signal)
    else:
        current = get_workers(s).get(ev.worker)
        if current is not None and current.invocation_id == ev.invocation_id:
            w = current
        w.state = {"fork": "starting", "disconnect": "disconnected"}.get(ev.event, ev.event)
        args = (w, _address(s)) if ev.event == "listening" else (w,)
    for h in list(handlers):
        h(*args)


def run(
    *,
    since: datetime | None = None,
    cursor: str | None = None,
    timeout: float | None = None,
    stop: Callable[[], bool] | None = None,
    settings: Settings | None = None,
) -> str | None:
    """Follow the journal and dispatch events to the ``on()`` handlers; blocks.

    Node's primary stays alive through its event loop; a Python primary calls
    this. From now on by default; ``since``/``cursor`` replay history first.
    Returns the cursor of the last record read (pass it back to resume) once
    ``timeout`` seconds pass or ``stop()`` is true.
    """
    s = settings or _current()
    reader = _events.EventReader(
        s.name, manager=s.manager, since=since, cursor=cursor, at_end=since is None and not cursor
    )
    try:
        for ev in reader.follow(timeout=timeout, stop=stop):
            dispatch(ev, s)
    finally:
        reader.close()
    return reader.cursor


wait = run


# ---- lifecycle and listing ---------------------------------------------------------


def start(*, settings: Settings | None = None) -> None:
    """Open the cluster's sockets, then start its workers (``NAME.target``) without waiting.

    The shared socket is started and waited for, so a taken port fails here;
    the workers are not: a target waits for every worker it wants, and a worker
    that crash-loops would keep ``systemctl start`` waiting for ever (``status``
    says how they do).
    """
    s = settings or _current()
    # A worker or socket left failed (a start limit in reuseport mode) must start again.
    systemctl("reset-failed", f"{s.name}@*.service", f"{s.name}@*.socket", settings=s, check=False)
    if scheduling(s) == names.SHARED:
        systemctl("start", names.socket(s.name, names.SHARED), settings=s)
    systemctl("start", "--no-block", names.target(s.name), settings=s)


def stop(*, settings: Settings | None = None, timeout: float | None = None) -> None:
    """Stop every worker and close the port (the sockets too); returns once they are down.

    The stop waits for the workers' stop jobs, killing one that keeps delaying its stop
    (:meth:`Manager.systemctl_bounded`); then this waits, at most the drain time and its
    margin, until no instance is listed as active or deactivating any more.
    """
    s = settings or _current()
    name = s.name
    sockets = (names.socket(name, names.SHARED), f"{name}@*.socket")
    workers = f"{name}@*.service"
    _bounded(
        "stop", names.target(name), *sockets, workers, units=[workers], settings=s, check=False
    )
    drain = s.spec.drain_timeout if s.spec else 30.0
    deadline = time.monotonic() + (drain + 5 if timeout is None else timeout)
    while time.monotonic() < deadline:
        listed = systemctl(
            "list-units",
            "--state=active,deactivating",
            "--plain",
            "--no-legend",
            f"{name}@*",
            settings=s,
            check=False,
        )
        if not listed.strip():
            return
        time.sleep(0.1)


@dataclass(frozen=True)
class ClusterSummary:
    """One row of ``clusterkit ls``."""

    name: str
    where: str  # "installed" or "up"
    running: int
    wanted: int | None
    state: str  # running | degraded | stopped
    cpu_seconds: float | None
    memory_bytes: int | None
    listen: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {**self.__dict__, "listen": list(self.listen)}


def clusters(*, user: bool = False) -> list[ClusterSummary]:
    """Every cluster on this host: installed (a manifest beside the units), or run by `up`."""
    from clusterkit.manager import running_ups

    found: dict[str, tuple[str, Manager]] = {}
    host = Manager("user" if user else "system")
    if host.is_running():
        for runtime in (False, True):
            unit_dir = Manager(host.scope, runtime=runtime).unit_dir
            for path in sorted(unit_dir.glob(f"*{manifest.SUFFIX}")):
                if unitfiles.is_ours(path):
                    found[path.name.removesuffix(manifest.SUFFIX)] = ("installed", host)
    if not user:
        for name, manager in running_ups().items():
            found.setdefault(name, ("up", manager))
    return [_summary(name, where, manager) for name, (where, manager) in sorted(found.items())]


def _summary(name: str, where: str, manager: Manager) -> ClusterSummary:
    s = Settings(name, manager, installed_spec(name, manager))
    workers = get_workers(s)
    running = [w for w in workers.values() if w.state in ("listening", "online")]
    wanted = s.spec.workers if s.spec else None
    if wanted is None:  # auto: what the generator made NAME.target want
        wants = _show([names.target(name)], ("Wants",), s)[0]["Wants"].split()
        wanted = sum(1 for u in wants if names.worker_id(u, name) is not None) or None
    usage = _show([w.unit for w in running], ("CPUUsageNSec", "MemoryCurrent"), s)
    cpu = [int(u["CPUUsageNSec"]) for u in usage if u["CPUUsageNSec"].isdigit()]
    memory = [int(u["MemoryCurrent"]) for u in usage if u["MemoryCurrent"].isdigit()]
    state = "stopped" if not running else "running" if len(running) >= (wanted or 1) else "degraded"
    return ClusterSummary(
        name,
        where,
        len(running),
        wanted,
        state,
        sum(cpu) / 1e9 if cpu else None,
        sum(memory) if memory else None,
        tuple(listen.address for listen in s.spec.listen) if s.spec else (),
    )
