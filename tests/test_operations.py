"""Everyday operation under real systemd: logs, stop/start, ls, status that says why.

Each test renders a small cluster with ``clusterkit generate``, puts its files
(units and manifest) where systemd reads runtime units in a container, and
drives it with the ``clusterkit`` CLI run inside, as an operator would.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from scenario import APPS, HOSTILE, shown_safely, wait_for

from clusterkit.container import Container

PY = sys.executable

# Prints two lines at start (the first in the form of the unit's own pid line,
# at the default level); exits 3 at once, after a last word, while /run/fail-K exists.
APP = r"""
import os, sys
sys.path.insert(0, __APPS__)
from clusterkit import cluster
from shim_worker import serve

k = cluster.worker.id
if os.path.exists(f"/run/fail-{k}"):
    print("FATAL: lost connection to database", flush=True)
    sys.exit(3)
print("clusterkit: started pid=1", flush=True)
print(f"worker {k} serving", flush=True)

def answer(conn):
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

serve(answer, 3000)
""".replace("__APPS__", repr(str(APPS)))


def ck(c: Container, *args: str) -> subprocess.CompletedProcess[str]:
    return c.run(PY, "-m", "clusterkit.cli", *args)


def deploy(
    c: Container, tmp_path: Path, name: str, port: int, workers: int = 2, app: str = APP
) -> None:
    c.write_file("/srv/app.py", app.replace("3000", str(port)))
    out = tmp_path / name
    subprocess.run(
        [PY, "-m", "clusterkit.cli", "generate", "--name", name, "--workers", str(workers)]
        + ["--exec", f"{PY} /srv/app.py", "--listen", str(port), "--output", str(out)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    c.install_units(sorted(out.iterdir()))  # the manifest goes beside the units too
    assert ck(c, "start", name).returncode == 0
    for i in range(workers):
        wait_for(f"{name}@{i} active", lambda i=i: active(c, f"{name}@{i}.service"))


def active(c: Container, unit: str) -> bool:
    return c.systemctl("is-active", unit, check=False).stdout.strip() == "active"


def serves(c: Container, port: int) -> bool:
    try:
        return c.http_get(port, timeout=2)[0] == 200
    except OSError:
        return False


def test_logs_show_what_workers_printed_with_their_id(container: Container, tmp_path: Path):
    c = container
    deploy(c, tmp_path, "t", 3000)
    lines = wait_for(
        "both start lines",
        lambda: (
            (r := ck(c, "logs", "t", "--json")).returncode == 0
            and len(
                [x for x in map(json.loads, r.stdout.splitlines()) if "serving" in x["message"]]
            )
            == 2
            and list(map(json.loads, r.stdout.splitlines()))
        ),
    )
    assert {(x["worker"], x["message"]) for x in lines} >= {
        (0, "worker 0 serving"),
        (1, "worker 1 serving"),
    }
    # The unit's own pid line (PRIORITY=5) is for events, not logs; the
    # worker's line of the same form, at its default level, is its log.
    own = [x for x in lines if x["message"].startswith("clusterkit: ")]
    assert own and all(
        x["message"] == "clusterkit: started pid=1" and x["priority"] == 6 for x in own
    ), own
    only_one = ck(c, "logs", "t", "--worker", "1").stdout
    assert "worker 1[" in only_one and "worker 0[" not in only_one


def test_status_says_why_a_worker_fails_and_exits_non_zero(container: Container, tmp_path: Path):
    c = container
    deploy(c, tmp_path, "t", 3000)
    assert ck(c, "status", "t").returncode == 0
    c.write_file("/run/fail-1", "")
    assert ck(c, "kill", "t", "1", "-s", "9").returncode == 0  # signals by number too

    def failing() -> str | None:
        r = ck(c, "status", "t")
        return r.stdout if r.returncode == 3 and "FATAL: lost connection" in r.stdout else None

    text = wait_for("status to say why worker 1 fails", failing)
    assert "worker 1:" in text and "worker 0:" not in text
    assert serves(c, 3000)  # worker 0 serves meanwhile
    rows = json.loads(ck(c, "status", "t", "--json").stdout)
    assert rows[0]["why"] is None and any("FATAL" in line for line in rows[1]["why"])
    # events --logs (what up shows): a death is followed by the worker's last words
    text = ck(c, "events", "t", "--logs").stdout
    assert "died: code 3\n    | FATAL: lost connection" in text, text
    # that run's own lines: its line shaped like an exit line too, not the unit's own
    assert (
        "died: signal SIGKILL\n    | clusterkit: started pid=1\n    | worker 1 serving\n" in text
    ), text
    r = ck(c, "kill", "t", "0", "-s", "NOPE")
    assert r.returncode == 2 and "--signal" in r.stderr


HOSTILE_APP = r"""
import os, sys
sys.path.insert(0, __APPS__)
from systemd import journal
from clusterkit import cluster
from shim_worker import serve

k = cluster.worker.id
journal.send("huge " + "h" * (1 << 20))  # one message of 1 MiB
journal.send(__HOSTILE__)  # the native protocol: one record, line feed and all
print(__HOSTILE__, flush=True)  # the stream: one record per line
if os.path.exists(f"/run/fail-{k}"):
    sys.exit(3)

def answer(conn):
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

serve(answer, 3000)
""".replace("__APPS__", repr(str(APPS))).replace("__HOSTILE__", repr(HOSTILE))
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def test_app_text_never_acts_on_the_operators_terminal(container: Container, tmp_path: Path):
    """logs, status and events --logs show the app's messages escaped, each line of one
    message under its record's prefix, so no byte of it reaches root's terminal as a
    control and no line of it poses as a line of clusterkit's own."""
    c = container
    deploy(c, tmp_path, "t", 3000, app=HOSTILE_APP)
    c.write_file("/run/fail-1", "")
    assert ck(c, "kill", "t", "1", "-s", "9").returncode == 0

    def failing() -> str | None:
        r = ck(c, "status", "t")
        return r.stdout if r.returncode == 3 and "pwned" in r.stdout else None

    status = wait_for("status to show worker 1's last words", failing)
    assert shown_safely(status), status
    assert not any(line.startswith("worker 0") for line in status.splitlines()), status
    assert "worker 1: |   worker 0: | serving\\x0bfake\\u202eevil" in status, status

    text = ck(c, "logs", "t").stdout
    assert shown_safely(text), text
    for line in text.splitlines():  # a record's first line, or one of its continuations
        assert RECORD.match(line) or line.startswith("    "), line
    assert "\n    worker 0: | serving\\x0bfake\\u202eevil\n" in text, text

    text = ck(c, "events", "t", "--logs").stdout
    assert shown_safely(text), text
    for line in text.splitlines():
        assert RECORD.match(line) or line.startswith("    | "), line
    assert "\n    |   worker 0: | serving\\x0bfake\\u202eevil\n" in text, text
    # --json keeps the message exactly as the app wrote it, escaped by JSON
    rows = [json.loads(x) for x in ck(c, "logs", "t", "--json").stdout.splitlines()]
    assert HOSTILE in {row["message"] for row in rows}
    # ... and whole however long; shown to a person, a message is cut at 4096 characters
    # (a worker logging a few messages of many MiB made every `logs` print all of them)
    assert {len(row["message"]) for row in rows} >= {5 + (1 << 20)}
    huge = [line for line in ck(c, "logs", "t").stdout.splitlines() if "huge hhh" in line]
    assert len(huge) >= 3, [line[:100] for line in huge]  # one in each run of each worker
    assert all(line.endswith(f"h [... {5 + (1 << 20) - 4096} more characters]") for line in huge)
    assert all(len(line) < 4096 + 200 for line in huge)


def test_stop_closes_the_port_until_start_and_ls_lists_clusters(
    container: Container, tmp_path: Path
):
    c = container
    deploy(c, tmp_path, "t", 3000)
    deploy(c, tmp_path, "u", 3001, workers=1)
    listed = json.loads(ck(c, "ls", "--json").stdout)
    assert [(r["name"], r["running"], r["state"], r["listen"]) for r in listed] == [
        ("t", 2, "running", ["3000"]),
        ("u", 1, "running", ["3001"]),
    ]
    assert "t " in ck(c, "ls").stdout

    assert ck(c, "stop", "t").returncode == 0
    assert not serves(c, 3000) and serves(c, 3001)
    # A connection attempt no longer starts a worker: the socket itself is closed.
    assert not serves(c, 3000)
    assert not active(c, "t@0.service") and not active(c, "t.socket")
    assert [r["state"] for r in json.loads(ck(c, "ls", "--json").stdout)] == ["stopped", "running"]

    assert ck(c, "start", "t").returncode == 0
    wait_for("t to serve again", lambda: serves(c, 3000))


def test_reload_in_batches_keeps_serving(container: Container, tmp_path: Path):
    import threading

    c = container
    deploy(c, tmp_path, "t", 3000, workers=4)
    failed: list[str] = []
    ok = [0]
    done = threading.Event()

    def load() -> None:  # bounded: one request at a time, until the reload ends
        while not done.is_set():
            try:
                status = c.http_get(3000, timeout=5)[0]
                ok[0] += 1
                if status != 200:
                    failed.append(str(status))
            except OSError as e:
                failed.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        r = ck(c, "reload", "t", "--batch", "50%")
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert r.returncode == 0, r.stderr
    assert [line.split("]")[0] for line in r.stdout.splitlines()[:4]] == [
        "[1/4",
        "[2/4",
        "[3/4",
        "[4/4",
    ]
    assert failed == [] and ok[0] > 0
    assert ck(c, "reload", "t", "--batch", "0").returncode == 2


def test_status_shows_the_sockets_error_when_the_port_is_taken(
    container: Container, tmp_path: Path
):
    c = container
    # Something else already listens on the port.
    c.run("systemd-run", "-q", "-u", "squatter", PY, "-m", "http.server", "3005", check=True)
    wait_for("the squatter to listen", lambda: serves(c, 3005))
    c.write_file("/srv/app.py", APP.replace("3000", "3005"))
    out = tmp_path / "t"
    subprocess.run(
        [PY, "-m", "clusterkit.cli", "generate", "--name", "t", "--workers", "1"]
        + ["--exec", f"{PY} /srv/app.py", "--listen", "3005", "--output", str(out)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    c.install_units(sorted(out.iterdir()))
    assert ck(c, "start", "t").returncode == 1  # systemd refuses: said on one line
    # An unprivileged process plants a record "about" the socket, as PID 1's would read:
    # status must show only what PID 1 itself wrote.
    forge = (
        "from systemd import journal; "
        "journal.send('FORGED socket error\u2028run this as root', UNIT='t.socket')"
    )
    c.run("systemd-run", "-q", "--wait", "-p", "DynamicUser=yes", PY, "-c", forge, check=True)
    r = ck(c, "status", "t")
    assert r.returncode == 3 and "t.socket is failed" in r.stdout, r.stdout
    assert "Address already in use" in r.stdout, r.stdout
    assert "FORGED" not in r.stdout, r.stdout


SLOW_APP = r"""
import os, time
time.sleep(2)  # an app that takes a while to import

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    pid = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-pid", pid)]})
    await send({"type": "http.response.body", "body": b"ok"})
"""


def test_run_serves_an_app_only_once_it_is_imported(container: Container, tmp_path: Path):
    """python -m clusterkit.run: READY=1 comes after the import, so a reload loses nothing."""
    c = container
    c.write_file("/srv/slowapp.py", SLOW_APP)
    out = tmp_path / "t"
    subprocess.run(
        [PY, "-m", "clusterkit.cli", "generate", "--name", "t", "--workers", "2"]
        + ["--exec", f"{PY} -m clusterkit.run asgi slowapp:app", "--working-directory", "/srv"]
        + ["--output", str(out)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    c.install_units(sorted(out.iterdir()))
    assert ck(c, "start", "t").returncode == 0
    for i in (0, 1):  # active = READY=1, which clusterkit.run sends after the import
        wait_for(f"t@{i} active", lambda i=i: active(c, f"t@{i}.service"))
    assert c.http_get(3000, timeout=5)[0] == 200  # ready means imported: no wait here
    r = ck(c, "reload", "t")
    assert r.returncode == 0 and "reloaded 2 workers" in r.stdout
    assert c.http_get(3000, timeout=5)[0] == 200
