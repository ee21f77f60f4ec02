"""Helpers for the scenario tests: deploy a cluster into a container, poll, load it.

- :func:`deploy` renders units with ``clusterkit generate`` on the host, installs
  them in a booted :class:`~clusterkit.container.Container` and starts
  ``NAME.target``; the :class:`Cluster` it returns asks systemd (``systemctl
  show``) and the journal (``clusterkit events NAME --json``) inside.
- :func:`wait_for` polls a predicate until it is truthy, with a deadline: no
  test ever asserts a wall-clock duration.
- :class:`Load` is a bounded HTTP load generator: threads that have joined a
  network namespace (the container's, or the host's) send GET requests
  continuously, one new connection each (or keep-alive), and record a
  :class:`Sample` per request: when it was sent, its outcome (``ok``,
  ``refused``, ``reset``, ``timeout``, ``non-2xx``, ``error``) and which
  worker answered (its ``X-Worker`` header). It stops by itself after
  ``max_requests`` or ``max_seconds``. Times are ``time.monotonic()`` of this
  host, the same clock as :meth:`Load.mark`, so a test can say "every request
  sent after T succeeded" (:meth:`LoadReport.failed` with ``sent_after=T``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from clusterkit.container import Container

try:
    from bench import http1
except ImportError:  # clusterkit installed from a wheel: the checkout's bench/ sits next to tests/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import http1

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"
#: the checkout's venv python: bound at the same path inside every container
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else sys.executable
#: a worker that answers with its id (tests/apps/whoami.py)
WHOAMI = f"{PY} {APPS / 'whoami.py'}"
PORT = 3000
MODES = ("shared", "reuseport")

T = TypeVar("T")

# What a hostile app writes for root to read: OSC 52 (set the clipboard), clear the
# screen, CSI in its one-byte C1 form, a CR, U+2028 and a line feed before text shaped
# like clusterkit's own lines, a vertical tab and a right-to-left override.
HOSTILE = (
    "pwned\x1b]52;c;cm0gLXJmIC8K\x07\x1b[2J\x9b31m\rworker 0: active\u2028worker 0: | ok"
    "\nworker 0: | serving\x0bfake\u202eevil"
)


def shown_safely(text: str) -> bool:
    """Nothing in *text* acts on a terminal, and HOSTILE is there, escaped."""
    return all(ch.isprintable() or ch in "\n\t" for ch in text) and "\\x1b]52;c;" in text


# -- polling -------------------------------------------------------------------------


def wait_for(
    what: str, predicate: Callable[[], T], timeout: float = 30, interval: float = 0.05
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; fail on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


def holds_for(
    what: str, predicate: Callable[[], object], duration: float, interval: float = 0.05
) -> None:
    """Check ``predicate`` throughout ``duration`` seconds; fail the first time it is false.

    For claims that something does not happen (no watchdog ping while the loop
    hangs): the window is the length of the claim, not a wait for something."""
    deadline = time.monotonic() + duration
    while True:
        value = predicate()
        if not value:
            pytest.fail(f"{what} stopped holding (value: {value!r})")
        if time.monotonic() > deadline:
            return
        time.sleep(interval)


# -- the CLI inside a container ----------------------------------------------------------


def ck(
    c: Container,
    *args: str,
    check: bool = True,
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``clusterkit ARGS`` inside container ``c``, run by the checkout's venv.

    ``prefix`` goes before it (e.g. ``setpriv --reuid=…`` to run as a user), ``env``
    is added to the clean environment. With ``check``, fail unless it exits 0;
    tests that assert on a refusal pass ``check=False``.
    """
    r = c.run(*prefix, PY, "-m", "clusterkit.cli", *args, env=env, timeout=timeout)
    if check:
        assert r.returncode == 0, f"clusterkit {' '.join(args)}: {r.stdout}{r.stderr}"
    return r


# -- deploying a cluster ------------------------------------------------------------------


def generate(out: Path, name: str, exec_line: str, *options: str) -> list[Path]:
    """Render units with ``clusterkit generate --name NAME --exec EXEC OPTIONS --output OUT``.

    Runs in ``out``'s parent, where no ``pyproject.toml`` adds settings.
    """
    out.mkdir(parents=True, exist_ok=True)
    argv = [PY, "-m", "clusterkit.cli", "generate", "--name", name, "--exec", exec_line]
    argv += [*options, "--output", str(out)]
    r = subprocess.run(argv, cwd=out.parent, capture_output=True, text=True)
    assert r.returncode == 0, f"generate failed: {r.stderr}"
    return sorted(p for p in out.iterdir() if p.is_file())


def install(c: Container, files: Iterable[Path]) -> None:
    """Install rendered units (and a ``--workers auto`` generator) inside, then daemon-reload."""
    units = []
    for f in files:
        if f.name.startswith("clusterkit-"):  # the generator: runs at daemon-reload
            c.write_file(f"/run/systemd/system-generators/{f.name}", f.read_text(), mode=0o755)
        else:
            units.append(f)
    c.install_units(units)


@dataclass
class Cluster:
    """A cluster deployed in a container, seen through systemctl and the journal inside."""

    c: Container
    name: str
    scheduling: str = "shared"
    port: int = PORT

    # systemd's view ------------------------------------------------------------
    def unit(self, k: int) -> str:
        return f"{self.name}@{k}.service"

    def socket_unit(self, k: int = 0) -> str:
        """The socket worker ``k`` accepts on: shared ``NAME.socket``, else ``NAME@K.socket``."""
        return f"{self.name}.socket" if self.scheduling == "shared" else f"{self.name}@{k}.socket"

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p PROPS UNIT`` as a dict."""
        out = self.c.systemctl("show", "-p", ",".join(props), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def state(self, unit: str) -> str:
        """``ActiveState/SubState``, e.g. ``active/running``."""
        p = self.show(unit, "ActiveState", "SubState")
        return f"{p['ActiveState']}/{p['SubState']}"

    def is_active(self, unit: str) -> bool:
        return self.c.systemctl("is-active", unit, check=False).stdout.strip() == "active"

    def main_pid(self, k: int) -> int:
        return int(self.show(self.unit(k), "MainPID")["MainPID"])

    def invocation_id(self, k: int) -> str:
        return self.show(self.unit(k), "InvocationID")["InvocationID"]

    def running_ids(self) -> list[int]:
        """Ids of the active instances of ``NAME@.service``."""
        out = self.c.systemctl(
            "list-units", "--plain", "--no-legend", "--state=active", f"{self.name}@*.service"
        ).stdout
        prefix = f"{self.name}@"
        ids = [line.split()[0][len(prefix) : -len(".service")] for line in out.splitlines()]
        return sorted(int(i) for i in ids if i.isdigit())

    def wait_active(self, ids: Iterable[int], timeout: float = 30) -> dict[int, int]:
        """Wait until workers ``ids`` are active with a main pid; returns {id: pid}."""
        pids: dict[int, int] = {}
        for k in ids:
            pids[k] = wait_for(
                f"{self.unit(k)} active",
                lambda k=k: self.is_active(self.unit(k)) and self.main_pid(k),
                timeout,
            )
        return pids

    # the CLI and the journal inside ---------------------------------------------------
    def ck(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """``clusterkit ARGS`` inside the container (see :func:`ck`)."""
        return ck(self.c, *args, check=check, timeout=timeout)

    def events(self, kind: str | None = None) -> list[dict[str, object]]:
        """``clusterkit events NAME --json``, optionally only one kind (``exit``...)."""
        lines = self.ck("events", self.name, "--json").stdout.splitlines()
        found = [json.loads(line) for line in lines if line.strip()]
        return [e for e in found if kind is None or e["event"] == kind]

    def wait_exit(
        self, what: str, match: Callable[[dict[str, object]], bool], timeout: float = 30
    ) -> dict[str, object]:
        """Wait for an ``exit`` event for which ``match(event)`` is true; return it."""
        return wait_for(
            what, lambda: next((e for e in self.events("exit") if match(e)), None), timeout
        )

    def get(self, path: str = "/", timeout: float = 10) -> Sample:
        """One request from the host, on a new connection (see :class:`Load`)."""
        return request_once(self.c.pid, "127.0.0.1", self.port, path, timeout)


def deploy(
    c: Container,
    tmp_path: Path,
    *options: str,
    name: str = "app",
    exec_line: str = WHOAMI,
    workers: int | str = 2,
    scheduling: str = "shared",
    port: int = PORT,
    start: bool = True,
) -> Cluster:
    """Generate units (``--workers``, ``--scheduling``, ``--listen PORT`` + OPTIONS), install them,
    and (``start``) start ``NAME.target`` and wait until every worker it wants is active."""
    flags = ["--workers", str(workers), "--scheduling", scheduling, "--listen", str(port)]
    files = generate(tmp_path / f"units-{name}", name, exec_line, *flags, *options)
    install(c, files)
    cluster = Cluster(c, name, scheduling, port)
    if start:
        c.systemctl("start", f"{name}.target")
        wanted = c.systemctl("show", "-p", "Wants", "--value", f"{name}.target").stdout.split()
        ids = sorted(int(u[len(name) + 1 : -8]) for u in wanted if u.startswith(f"{name}@"))
        assert ids, f"{name}.target wants no workers: {wanted}"
        cluster.wait_active(ids)
    return cluster


# -- processes inside ---------------------------------------------------------------------


def inner_pid(proc: subprocess.Popen[str], timeout: float = 10) -> int:
    """Host pid of the command a :meth:`Container.popen` started (the child of nsenter)."""
    path = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")

    def child() -> int:
        try:
            kids = path.read_text().split()
        except OSError:
            return 0
        return int(kids[0]) if kids else 0

    return wait_for("the process inside to start", child, timeout)


def has_journal_open(pid: int) -> bool:
    """True once process ``pid`` (host pid) has a journal file open (it reads the journal)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(".journal"):
                return True
        except OSError:
            continue
    return False


# -- load ---------------------------------------------------------------------------------

# the HTTP client and its outcome names are the benchmark's (bench/http1.py): one implementation
OK, REFUSED, RESET, TIMEOUT, NON_2XX, ERROR = (
    http1.OK,
    http1.REFUSED,
    http1.RESET,
    http1.TIMEOUT,
    http1.NON_2XX,
    http1.ERROR,
)
join_netns = http1.join_netns
run_in_netns = http1.run_in_netns
_Conn = http1.Conn
_classify = http1.classify


@dataclass(frozen=True)
class Sample:
    """One request: when it was sent (monotonic, at connect), how it ended, who answered."""

    sent: float
    done: float
    outcome: str
    status: int | None = None
    worker: str | None = None  # the X-Worker header
    error: str = ""
    body: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == OK


def _one(conn: _Conn, host: str, path: str, keepalive: bool, sent: float) -> tuple[Sample, bool]:
    """Send one request on ``conn``; (sample, connection still usable)."""
    try:
        status, headers, body, open_ = conn.request(host, path, keepalive)
    except Exception as e:  # noqa: BLE001 - every failure is a recorded outcome
        return Sample(sent, time.monotonic(), _classify(e), error=repr(e)), False
    outcome = OK if 200 <= status < 300 else NON_2XX
    text = body[:200].decode(errors="replace")
    return Sample(
        sent, time.monotonic(), outcome, status, headers.get("x-worker"), body=text
    ), open_


def request_once(
    netns_pid: int | None, host: str, port: int, path: str = "/", timeout: float = 10
) -> Sample:
    """One GET on a new connection, from the network namespace of ``netns_pid`` (None: here)."""
    box: list[Sample] = []

    def go() -> None:
        if netns_pid is not None:
            join_netns(netns_pid)
        sent = time.monotonic()
        try:
            conn = _Conn(host, port, timeout)
        except Exception as e:  # noqa: BLE001
            box.append(Sample(sent, time.monotonic(), _classify(e), error=repr(e)))
            return
        try:
            box.append(_one(conn, host, path, False, sent)[0])
        finally:
            conn.close()

    t = threading.Thread(target=go, name="ck-request")
    t.start()
    t.join()
    return box[0]


@dataclass
class LoadReport:
    """What a :class:`Load` recorded, in send order, with the marks the test set."""

    samples: list[Sample]
    marks: dict[str, float] = field(default_factory=dict)

    def select(
        self, sent_after: float | None = None, sent_before: float | None = None
    ) -> list[Sample]:
        return [
            s
            for s in self.samples
            if (sent_after is None or s.sent >= sent_after)
            and (sent_before is None or s.sent < sent_before)
        ]

    def ok(self, **window: float | None) -> list[Sample]:
        return [s for s in self.select(**window) if s.ok]

    def failed(self, **window: float | None) -> list[Sample]:
        """Failed requests, optionally only those sent in ``[sent_after, sent_before)``."""
        return [s for s in self.select(**window) if not s.ok]

    def outcomes(self, **window: float | None) -> Counter[str]:
        return Counter(s.outcome for s in self.select(**window))

    def workers(self, **window: float | None) -> Counter[str | None]:
        """Successful responses per worker id."""
        return Counter(s.worker for s in self.select(**window) if s.ok)

    def summary(self, limit: int = 10) -> str:
        """A line of counts, then up to ``limit`` failures, timed from the first request."""
        start = self.samples[0].sent if self.samples else 0.0
        marks = ", ".join(f"{k}=+{v - start:.3f}s" for k, v in self.marks.items())
        lines = [
            f"{len(self.samples)} requests: {dict(self.outcomes())}; "
            f"per worker {dict(self.workers())}; marks {marks}"
        ]
        for s in self.failed()[:limit]:
            lines.append(
                f"  +{s.sent - start:.3f}s..+{s.done - start:.3f}s "
                f"{s.outcome} {s.status or ''} {s.error}"
            )
        return "\n".join(lines)


class Load:
    """Bounded continuous HTTP load from ``concurrency`` threads; see the module docstring.

    ``netns_pid``: send from that process's network namespace (a container's
    PID 1), or from this one (None). Each thread sends one request at a time,
    on a new connection per request (``keepalive=False``, the default: every
    request goes through accept()), or on one kept-alive connection that is
    reopened after a failure. ``pause`` seconds between a thread's requests keep
    a small machine responsive. Stops after ``max_requests`` requests or
    ``max_seconds``, or on :meth:`stop`; use as a context manager.
    """

    def __init__(
        self,
        netns_pid: int | None,
        port: int = PORT,
        *,
        host: str = "127.0.0.1",
        path: str = "/",
        concurrency: int = 4,
        max_requests: int = 50_000,
        max_seconds: float = 120,
        timeout: float = 15,
        keepalive: bool = False,
        pause: float = 0.002,
    ) -> None:
        self.netns_pid, self.port, self.host, self.path = netns_pid, port, host, path
        self.concurrency, self.max_requests, self.max_seconds = (
            concurrency,
            max_requests,
            max_seconds,
        )
        self.timeout, self.keepalive, self.pause = timeout, keepalive, pause
        self.samples: list[Sample] = []  # appended by the threads (list.append is atomic)
        self.marks: dict[str, float] = {}
        self._lock = threading.Lock()
        self._sent = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    def start(self) -> Load:
        self._deadline = time.monotonic() + self.max_seconds
        for i in range(self.concurrency):
            t = threading.Thread(target=self._run, name=f"ck-load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _claim(self) -> bool:
        with self._lock:
            if (
                self._stop.is_set()
                or self._sent >= self.max_requests
                or time.monotonic() > self._deadline
            ):
                return False
            self._sent += 1
            return True

    def _run(self) -> None:
        try:
            if self.netns_pid is not None:
                join_netns(self.netns_pid)
            conn: _Conn | None = None
            while self._claim():
                sent = time.monotonic()
                if conn is None:
                    try:
                        conn = _Conn(self.host, self.port, self.timeout)
                    except Exception as e:  # noqa: BLE001
                        self.samples.append(
                            Sample(sent, time.monotonic(), _classify(e), error=repr(e))
                        )
                        self._stop.wait(self.pause)
                        continue
                sample, usable = _one(conn, self.host, self.path, self.keepalive, sent)
                self.samples.append(sample)
                if not (self.keepalive and usable):
                    conn.close()
                    conn = None
                if self.pause:
                    self._stop.wait(self.pause)
            if conn is not None:
                conn.close()
        except BaseException as e:  # a bug in the generator itself: report it at stop()
            self._errors.append(e)

    def mark(self, label: str) -> float:
        """Record ``time.monotonic()`` under ``label`` (shown in the summary) and return it."""
        self.marks[label] = now = time.monotonic()
        return now

    def count(self, sent_after: float | None = None, ok: bool = True) -> int:
        """Requests finished so far (only successful ones if ``ok``), sent from ``sent_after``."""
        return sum(
            1
            for s in list(self.samples)
            if (sent_after is None or s.sent >= sent_after) and (s.ok or not ok)
        )

    def wait_requests(self, n: int, sent_after: float | None = None, timeout: float = 30) -> None:
        """Wait until ``n`` requests sent after ``sent_after`` have succeeded (load flows)."""
        if not self.running:
            pytest.fail("the load generator stopped before the test was done with it")
        wait_for(f"{n} successful requests", lambda: self.count(sent_after) >= n, timeout)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self) -> LoadReport:
        """Stop sending, wait for the requests in flight, return the report."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        if self._errors:
            raise self._errors[0]
        return LoadReport(sorted(self.samples, key=lambda s: s.sent), dict(self.marks))

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)


def load(cluster: Cluster, **options: object) -> Load:
    """A :class:`Load` against ``cluster``'s port from inside its container's network."""
    return Load(cluster.c.pid, cluster.port, **options)  # type: ignore[arg-type]


def failures_only_in_flight(report: LoadReport, killed_at: float, allowed: int) -> str | None:
    """Why the failures are not "only requests in flight at ``killed_at``", or None if they are.

    In flight means sent before the kill and failed by a reset (the dead worker's
    connection closed under it): never refused, never timed out, at most ``allowed``.
    """
    late = report.failed(sent_after=killed_at)
    if late:
        return f"{len(late)} request(s) sent after the kill failed"
    early = report.failed(sent_before=killed_at)
    bad = [s for s in early if s.outcome != RESET]
    if bad:
        return f"{len(bad)} failure(s) other than a reset: {Counter(s.outcome for s in bad)}"
    if len(early) > allowed:
        return f"{len(early)} failures, more than the {allowed} that can be in flight"
    return None


def ids_of(samples: Sequence[Sample]) -> set[str]:
    """Worker ids that answered these samples."""
    return {s.worker for s in samples if s.ok and s.worker is not None}


class Lines:
    """Collects the stdout lines of a :meth:`Container.popen` process from a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, name="ck-lines", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def json(self) -> list[dict[str, object]]:
        """The lines that are JSON objects."""
        found = []
        for line in list(self.lines):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found
