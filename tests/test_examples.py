"""The framework examples (examples/flask, examples/fastapi, examples/django) on real systemd.

Each test boots a container, renders the example's units from its own
``pyproject.toml`` (``clusterkit generate --config``, with ``--exec`` pointing at
this checkout's venv, which the container sees at the same path, and two
workers), puts every generated file (units and manifest) into the container's
/run/systemd/system and drives the cluster with the ``clusterkit`` CLI inside,
as an operator would: ``start``, ``kill``, ``reload``, ``events``, ``logs``.
For each example: every worker serves, the port stays open through a SIGKILL
of a worker and the worker comes back, ``reload`` loses no request under a
small load, the exit event is reported, and the app's own log line shows up
in ``clusterkit logs``. Django also writes a row into its sqlite database in the
state directory and reads it back from every worker.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
from scenario import (
    PY,
    REFUSED,
    ROOT,
    Cluster,
    failures_only_in_flight,
    ids_of,
    load,
    wait_for,
)

from clusterkit.container import Container

EXAMPLES = ROOT / "examples"
WORKERS = (0, 1)
CONCURRENCY = 2


@dataclass(frozen=True)
class Example:
    directory: str  # under examples/
    name: str  # [tool.clusterkit] name
    port: int  # its first listen
    log_line: str  # printed or logged by the app at start-up


EXAMPLE_LIST = [
    Example("flask", "flask-example", 3001, "Flask app loaded, serving"),
    Example("fastapi", "fastapi-example", 3002, "FastAPI app started, serving"),
    Example("django", "django-example", 3003, "django-example: database"),
]


def start_example(c: Container, tmp_path: Path, ex: Example) -> Cluster:
    """Generate the example's units from its pyproject.toml, install them inside, start it."""
    directory = EXAMPLES / ex.directory
    out = tmp_path / "units"
    argv = [PY, "-m", "clusterkit.cli", "generate", "--config", str(directory / "pyproject.toml")]
    argv += ["--exec", f"{PY} {directory / 'serve.py'}", "--workers", str(len(WORKERS))]
    r = subprocess.run([*argv, "--output", str(out)], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, f"generate: {r.stdout}{r.stderr}"
    files = sorted(p for p in out.iterdir() if p.is_file())
    assert f"{ex.name}.clusterkit.json" in {f.name for f in files}, files
    c.install_units(files)  # units and the manifest, into /run/systemd/system
    cl = Cluster(c, ex.name, "shared", ex.port)
    cl.ck("start", ex.name)
    cl.wait_active(WORKERS, timeout=60)
    return cl


def every_worker_serves(cl: Cluster) -> None:
    """Send requests until each worker has answered one, with no failure."""
    want = {str(k) for k in WORKERS}
    with load(cl, concurrency=CONCURRENCY, max_requests=5000, max_seconds=60) as ld:
        wait_for(f"answers from workers {sorted(want)}", lambda: want <= ids_of(ld.samples))
    report = ld.stop()
    assert not report.failed(), report.summary()
    body = report.ok()[0].body
    assert "hello from" in body, body


def survives_sigkill(cl: Cluster, k: int = 1) -> None:
    """``clusterkit kill NAME K -s 9`` under load: the port stays open, the worker comes back,
    and ``clusterkit events`` reports the exit."""
    victim = cl.main_pid(k)
    with load(cl, concurrency=CONCURRENCY, max_requests=20_000, max_seconds=90) as ld:
        ld.wait_requests(50)
        cl.ck("kill", cl.name, str(k), "-s", "9")
        killed = ld.mark("kill")
        wait_for(
            f"{cl.unit(k)} back with a new pid",
            lambda: cl.is_active(cl.unit(k)) and cl.main_pid(k) not in (0, victim),
            timeout=60,
        )
        back = ld.mark("back")
        wait_for(
            f"the new worker {k} to answer",
            lambda: str(k) in ids_of([s for s in list(ld.samples) if s.sent >= back]),
        )
    report = ld.stop()
    assert not report.outcomes()[REFUSED], report.summary()  # systemd kept the port open
    why = failures_only_in_flight(report, killed, allowed=CONCURRENCY)
    assert why is None, f"{why}\n{report.summary()}"
    event = cl.wait_exit(
        f"the exit event of worker {k}",
        lambda e: e["worker"] == k and e["signal"] == "SIGKILL" and e["pid"] in (victim, None),
    )
    assert event["code"] is None, event


def reload_loses_nothing(cl: Cluster) -> None:
    """``clusterkit reload NAME`` under a small load replaces every worker, 0 failed requests."""
    before = {k: cl.invocation_id(k) for k in WORKERS}
    with load(cl, concurrency=CONCURRENCY, max_requests=20_000, max_seconds=90) as ld:
        ld.wait_requests(50)
        out = cl.ck("reload", cl.name).stdout
        done = ld.mark("reloaded")
        ld.wait_requests(50, sent_after=done)
        want = {str(k) for k in WORKERS}
        wait_for(
            "every new worker to answer",
            lambda: want <= ids_of([s for s in list(ld.samples) if s.sent >= done]),
        )
    report = ld.stop()
    after = {k: cl.invocation_id(k) for k in WORKERS}
    assert all(after[k] and after[k] != before[k] for k in WORKERS), (before, after, out)
    assert not report.failed(), report.summary()


def app_line_in_logs(cl: Cluster, text: str) -> None:
    """A line the app printed or logged shows up in ``clusterkit logs NAME --json``."""

    def found() -> set[int]:
        lines = cl.ck("logs", cl.name, "--json", "-n", "500").stdout.splitlines()
        return {x["worker"] for x in map(json.loads, lines) if text in x["message"]}

    wait_for(
        f"{text!r} in clusterkit logs from every worker",
        lambda: found() >= set(WORKERS),
    )


@pytest.mark.parametrize("ex", EXAMPLE_LIST, ids=[e.directory for e in EXAMPLE_LIST])
def test_example_serves_survives_sigkill_and_reload(
    container: Container, tmp_path: Path, ex: Example
) -> None:
    cl = start_example(container, tmp_path, ex)
    every_worker_serves(cl)
    app_line_in_logs(cl, ex.log_line)
    survives_sigkill(cl)
    reload_loses_nothing(cl)


# -- Django's database, in the state directory ----------------------------------------------


def request(
    c: Container, port: int, method: str, path: str, form: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    """One HTTP request to ``127.0.0.1:port`` inside the container: (status, headers, body)."""
    sock = c.socket()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        conn.sock = sock
        headers = {"Connection": "close"}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, text
    finally:
        conn.close()
        sock.close()


def test_django_writes_to_its_state_directory_and_every_worker_reads_it(
    container: Container, tmp_path: Path
) -> None:
    c = container
    ex = next(e for e in EXAMPLE_LIST if e.directory == "django")
    cl = start_example(c, tmp_path, ex)
    assert cl.show(cl.unit(0), "DynamicUser")["DynamicUser"] == "yes"  # the default sandbox

    status, headers, body = request(c, ex.port, "POST", "/notes", {"text": "written by a test"})
    assert status == 201, body
    note = json.loads(body)
    assert note["text"] == "written by a test" and str(note["worker"]) == headers["x-worker"]

    readers: set[str] = set()

    def read_back_by_every_worker() -> bool:
        status, headers, body = request(c, ex.port, "GET", "/notes")
        if status == 200 and note["id"] in {n["id"] for n in json.loads(body)["notes"]}:
            readers.add(headers["x-worker"])
        return readers >= {str(k) for k in WORKERS}

    wait_for("every worker to read the note back", read_back_by_every_worker)
    # the database is the state directory's, kept across restarts
    db = c.run("test", "-s", "/var/lib/django-example/db.sqlite3")
    assert db.returncode == 0, "no database in /var/lib/django-example"
    cl.ck("reload", cl.name)
    status, _, body = request(c, ex.port, "GET", "/notes")
    assert status == 200 and note["id"] in {n["id"] for n in json.loads(body)["notes"]}, body
