"""Exit reporting, journal events and the primary, under real systemd (containers).

Each test renders units with ``clusterkit generate``, boots a throwaway systemd
(:mod:`clusterkit.container`), and drives the cluster with the ``clusterkit``
CLI and the primary API run *inside* it (the journal is there). No wall-clock
assertions: every wait polls with a deadline.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from scenario import APPS, PORT, ck, deploy, has_journal_open, inner_pid, wait_for

from clusterkit.container import CONTAINER_PATH, Container

PY = sys.executable  # the checkout's venv, bound at the same path inside
ARGS = ["a b", "100%", "$HOME", "x%iy", "50% $PATH %%"]

# Uses only cluster.is_worker, cluster.worker.listen(3000), .ready() and .id.
# SIGTERM sets a flag checked between connections (graceful); USR1/USR2 end
# the process with status 3/0, the test's stand-ins for a crash and a clean exit.
WORKER = r"""
import json, os, signal, sys
sys.path.insert(0, __APPS__)
from clusterkit import cluster
from shim_worker import serve

signal.signal(signal.SIGUSR1, lambda s, f: sys.exit(3))
signal.signal(signal.SIGUSR2, lambda s, f: sys.exit(0))
assert cluster.is_worker

def answer(conn):
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    body = json.dumps({
        "id": cluster.worker.id, "pid": os.getpid(), "argv": sys.argv[1:],
        "greeting": os.environ.get("CK_GREETING"),
    }).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    conn.sendall(head % len(body) + body)

serve(answer, 3000)
""".replace("__APPS__", repr(str(APPS)))


def deploy_worker(c: Container, tmp_path: Path, *options: str, **kw: Any) -> None:
    """scenario.deploy of WORKER, with argv words holding %, $ and spaces (cluster "t")."""
    c.write_file("/srv/ck-worker.py", WORKER)
    exec_line = " ".join([PY, "/srv/ck-worker.py", *(f"'{a}'" for a in ARGS)])
    deploy(c, tmp_path, *options, name="t", exec_line=exec_line, port=PORT, **kw)


def is_active(c: Container, unit: str) -> bool:
    return c.systemctl("is-active", unit, check=False).stdout.strip() == "active"


def get(c: Container) -> dict[str, object]:
    status, body = c.http_get(PORT)
    assert status == 200
    return json.loads(body)


def exits(c: Container, name: str = "t") -> list[dict[str, object]]:
    lines = ck(c, "events", name, "--json").stdout.splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "exit"]


def main_pid(c: Container, unit: str) -> int:
    return int(c.systemctl("show", "-p", "MainPID", "--value", unit).stdout)


def test_kills_crashes_and_clean_exits_reach_events_and_status(
    container: Container, tmp_path: Path
):
    """SIGKILL, exit 3 and exit 0 come back as Node's exit(worker, code, signal), in
    ``clusterkit events`` and ``clusterkit status``."""
    c = container
    deploy_worker(c, tmp_path)

    # both workers answer on the port, with argv intact; PID 1 holds the socket
    seen: dict[int, dict[str, object]] = {}
    wait_for(
        "both workers to answer", lambda: seen.update({(b := get(c))["id"]: b}) or len(seen) == 2
    )
    assert all(b["argv"] == ARGS for b in seen.values())
    listeners = c.run("ss", "-ltnpH", f"sport = :{PORT}", check=True).stdout
    assert '("systemd",pid=1,' in listeners, listeners

    # SIGKILL worker 1: no request sent after the kill fails
    killed_pid = main_pid(c, "t@1.service")
    c.systemctl("kill", "-s", "KILL", "t@1.service")
    for _ in range(30):
        get(c)
    wait_for("t@1 back", lambda: is_active(c, "t@1.service") and main_pid(c, "t@1.service"))

    # status 3 in worker 0, then a clean exit 0 in worker 1
    crashed_pid = main_pid(c, "t@0.service")
    c.systemctl("kill", "-s", "USR1", "t@0.service")
    wait_for("exit 3 recorded", lambda: len(exits(c)) == 2)
    wait_for("t@0 back", lambda: is_active(c, "t@0.service") and main_pid(c, "t@0.service"))
    clean_pid = main_pid(c, "t@1.service")
    c.systemctl("kill", "-s", "USR2", "t@1.service")
    found = wait_for("three exits", lambda: (e := exits(c)) and len(e) == 3 and e)

    got = [(e["worker"], e["pid"], e["code"], e["signal"]) for e in found]
    assert got == [
        (1, killed_pid, None, "SIGKILL"),
        (0, crashed_pid, 3, None),
        (1, clean_pid, 0, None),
    ]
    for e in found:
        assert e["exited_after_disconnect"] is False
        assert set(e) >= {"event", "worker", "pid", "code", "signal", "invocation_id", "time"}
    assert len({e["invocation_id"] for e in found}) == 3

    text = ck(c, "events", "t").stdout
    assert f"worker 1 (pid {killed_pid}) died: signal SIGKILL" in text
    assert f"worker 0 (pid {crashed_pid}) died: code 3" in text

    wait_for("t@1 back again", lambda: is_active(c, "t@1.service"))
    status = json.loads(ck(c, "status", "t", "--json").stdout)
    assert [w["id"] for w in status] == [0, 1]
    assert all(w["state"] == "listening" and w["pid"] for w in status)
    assert status[1]["last_exit"]["code"] == 0 and status[1]["restarts"] == 2
    # the last exit of each (read from the tail back), not the first
    assert [w["last_exit"]["pid"] for w in status] == [crashed_pid, clean_pid]


# A forger with the journal's native protocol: PID 1's record ids and fields,
# claiming that worker 0 ended cleanly, written by an ordinary (sandboxed) process.
FORGED = (
    "import sys; from systemd import journal; inv = sys.argv[1]; "
    "journal.send('t@0.service: Deactivated successfully.', "
    "MESSAGE_ID='7ad2d189f7e94e70a38c781354912448', UNIT='t@0.service', INVOCATION_ID=inv); "
    "journal.send('Stopping t@0', MESSAGE_ID='de5b426a63be47a7b6ac3eaac82e2f6f', "
    "UNIT='t@0.service', INVOCATION_ID=inv)"
)


def test_exit_events_come_only_from_records_no_worker_can_write(
    container: Container, tmp_path: Path
):
    c = container
    deploy_worker(c, tmp_path, workers=1)
    invocation = c.systemctl("show", "-p", "InvocationID", "--value", "t@0.service").stdout.strip()
    # an outsider forges PID 1's "run ended" and "stopping" records for the live run
    c.run("systemd-run", "--wait", "-q", "-p", "DynamicUser=yes", PY, "-c", FORGED, invocation)
    assert exits(c) == []
    c.systemctl("kill", "-s", "KILL", "t@0.service")
    found = wait_for("the real exit", lambda: exits(c))
    assert [(e["code"], e["signal"], e["exited_after_disconnect"]) for e in found] == [
        (None, "SIGKILL", False)
    ]
    assert found[0]["invocation_id"] == invocation


def test_late_reader_replays_history_without_loss_or_duplicates(
    container: Container, tmp_path: Path
):
    c = container
    deploy_worker(c, tmp_path)
    # an early follower, started before the events below
    follower = subprocess.Popen(
        ["nsenter", "--all", "-t", str(c.pid), "env", "-i", f"PATH={CONTAINER_PATH}"]
        + [PY, "-m", "clusterkit.cli", "events", "t", "--follow", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[dict[str, object]] = []
    reader = threading.Thread(target=lambda: lines.extend(map(json.loads, follower.stdout)))
    reader.start()
    try:
        wait_for("the follower to read the journal", lambda: has_journal_open(inner_pid(follower)))
        for sig, unit in (("KILL", "t@1.service"), ("USR2", "t@0.service")):
            wait_for(f"{unit} active", lambda u=unit: is_active(c, u))
            c.systemctl("kill", "-s", sig, unit)
        wait_for("t@1 back", lambda: is_active(c, "t@1.service"))
        ck(c, "disconnect", "t", "1")
        wait_for("3 exits", lambda: len(exits(c)) == 3)
        history = [json.loads(x) for x in ck(c, "events", "t", "--json").stdout.splitlines()]
        wait_for(
            "the follower to catch up", lambda: len([e for e in lines if e["event"] == "exit"]) == 3
        )
    finally:
        follower.terminate()  # our own child
        follower.wait(10)
        reader.join(10)

    keys = [(e["cursor"], e["event"]) for e in history]
    assert len(keys) == len(set(keys)), "duplicates in history"
    assert lines == history[-len(lines) :], "the follower saw what history shows, in order"

    # resume from any cursor: exactly the rest, in order
    middle = len(history) // 2
    cursor = history[middle]["cursor"]
    rest = ck(c, "events", "t", "--json", "--after-cursor", cursor).stdout.splitlines()
    expected = [e for e in history[middle:] if e["cursor"] != cursor]
    assert [json.loads(x) for x in rest] == expected
    assert [e["event"] for e in history].count("disconnect") == 1


PRIMARY = r"""
import json, sys
from datetime import UTC, datetime
from clusterkit import cluster

out = []
cluster.setup_primary(name="t")
for ev in ("fork", "online", "disconnect"):
    cluster.on(ev, lambda w, ev=ev: out.append([ev, w.id]))
cluster.on("listening", lambda w, a: out.append(["listening", w.id, a["port"]]))
cluster.on("exit", lambda w, code, sig: out.append(
    ["exit", w.id, code, sig, w.exited_after_disconnect, w.process.pid]))

assert cluster.is_primary and cluster.scheduling_policy == "shared"
workers = cluster.workers
assert sorted(workers) == [0, 1], workers
w = workers[1]
old_pid = w.process.pid
w.disconnect()
assert w.exited_after_disconnect is True and w.is_dead(), w
new = cluster.fork(env={"CK_GREETING": "hi 100% $USER"})
assert new.id == 1 and new.state == "listening" and new.pid != old_pid, new
since = datetime.fromtimestamp(float(sys.argv[1]), UTC)
cursor = cluster.run(since=since,
                     stop=lambda: len([o for o in out if o[0] == "listening"]) >= 1, timeout=20)
print(json.dumps({"events": out, "old_pid": old_pid, "cursor": cursor}))
"""


def test_primary_disconnect_fork_and_handlers(container: Container, tmp_path: Path):
    c = container
    deploy_worker(c, tmp_path)
    since = c.run("date", "+%s.%N", check=True).stdout.strip()
    c.write_file("/srv/primary.py", PRIMARY)
    r = c.run(PY, "/srv/primary.py", since, timeout=60)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["events"] == [
        ["disconnect", 1],
        ["exit", 1, 0, None, True, result["old_pid"]],
        ["fork", 1],
        ["online", 1],
        ["listening", 1, PORT],
    ]
    assert ck(c, "status", "t", "--json").stdout
    greetings = set()
    wait_for("the forked worker", lambda: greetings.add(get(c)["greeting"]) or len(greetings) == 2)
    assert greetings == {None, "hi 100% $USER"}


def test_reload_replaces_every_worker_with_no_failed_request(container: Container, tmp_path: Path):
    c = container
    deploy_worker(c, tmp_path)
    before = {
        w["id"]: w["invocation_id"] for w in json.loads(ck(c, "status", "t", "--json").stdout)
    }
    results = {"ok": 0, "failed": []}
    done = threading.Event()

    def load() -> None:  # bounded: one request at a time per thread, until reload ends
        while not done.is_set():
            try:
                get(c)
                results["ok"] += 1
            except (OSError, AssertionError, json.JSONDecodeError) as e:
                results["failed"].append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        out = ck(c, "reload", "t").stdout
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert "[1/2] worker 0" in out and "[2/2] worker 1" in out
    after = {w["id"]: w["invocation_id"] for w in json.loads(ck(c, "status", "t", "--json").stdout)}
    assert set(after) == {0, 1} and all(after[i] != before[i] for i in after)
    assert results["failed"] == [] and results["ok"] > 0
    # the old runs ended as requested stops, with status 0
    found = wait_for("both exits", lambda: (e := exits(c)) and len(e) == 2 and e)
    assert [(e["worker"], e["code"], e["exited_after_disconnect"]) for e in found] == [
        (0, 0, True),
        (1, 0, True),
    ]


def test_reuseport_scale_stops_the_sockets_too(container: Container, tmp_path: Path):
    c = container
    deploy_worker(c, tmp_path, scheduling="reuseport")
    ck(c, "scale", "t", "1")
    assert not is_active(c, "t@1.service") and not is_active(c, "t@1.socket")
    for _ in range(20):  # nothing hashed to a socket without a worker
        assert get(c)["id"] == 0
    ck(c, "scale", "t", "3")
    assert all(is_active(c, f"t@{i}.{kind}") for i in range(3) for kind in ("socket", "service"))
    assert json.loads(ck(c, "status", "t", "--json").stdout)[2]["state"] == "listening"


def test_cli_bad_input_and_missing_cluster(container: Container):
    r = ck(container, "kill", "t", "x", check=False)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    r = ck(container, "events", "t", "--since=yesterday-ish", check=False)
    assert r.returncode == 2 and "--since" in r.stderr
    for command in (("kill", "nope", "0"), ("status", "nope", "--json"), ("events", "nope")):
        r = ck(container, *command, check=False)
        assert r.returncode == 4 and len(r.stderr.splitlines()) == 1, r.stderr
        assert "no cluster 'nope'" in r.stderr


def test_watchdog_kill_is_reported(container: Container, tmp_path: Path):
    """WORKER never sends WATCHDOG=1: systemd kills it (SIGABRT), the reporter says so."""
    deploy_worker(container, tmp_path, "--watchdog-sec", "1", workers=1)
    found = wait_for("a watchdog exit", lambda: exits(container))
    e = found[0]
    assert (e["worker"], e["code"], e["signal"]) == (0, None, "SIGABRT")
    assert e["service_result"] == "watchdog" and e["exited_after_disconnect"] is False
