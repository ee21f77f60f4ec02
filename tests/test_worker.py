"""The worker shim against sockets passed the way systemd passes them
(see localworker.py for how the sockets are passed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest
from localworker import (
    ACTIVATE,
    PYTHON,
    Proc,
    free_port,
    ignore_errors,
    listening_inodes,
    needs_activate,
    request,
    start_activated,
    with_socket_as_fd3,
)
from scenario import holds_for, wait_for


@needs_activate
def test_socket_activated_worker_uses_passed_fd(procs, app_script, notify_socket):
    p, port = start_activated(procs, app_script, "asyncio", notify_socket)
    status, _, body = request(port, "/info")
    info = json.loads(body)
    assert status == 200
    assert info["pid"] == p.pid  # systemd-socket-activate exec'd the worker: LISTEN_PID
    assert info["activated"] is True
    assert info["fd"] == 3 and info["sockets"] == [3]
    assert info["id"] == 1 and info["unit"] == "hello@1.service" and info["is_worker"] is True
    # the only listening socket the worker holds is fd 3, bound by systemd-socket-activate
    assert listening_inodes(p.pid) == {"3"}
    notify_socket.wait_for("READY=1")
    assert notify_socket.assignments().count("READY=1") == 1


@needs_activate
def test_one_passed_socket_is_used_whatever_port_the_code_names(procs, app_script, notify_socket):
    # The unit owns the address: code saying listen(3000) serves on the unit's port.
    p, port = start_activated(procs, app_script, "asyncio", notify_socket, address=3000)
    info = json.loads(request(port, "/info")[2])
    assert info["fd"] == 3 and info["activated"] is True
    assert listening_inodes(p.pid) == {"3"}


@needs_activate
def test_sigterm_drains_in_flight_and_exits_0(procs, app_script, notify_socket):
    p, port = start_activated(procs, app_script, "asyncio", notify_socket, CK_SLOW="0.8")
    notify_socket.wait_for("READY=1")
    results: list[object] = []

    def slow() -> None:
        try:
            results.append(request(port, "/slow")[0])
        except Exception as e:  # noqa: BLE001 - recorded and asserted below
            results.append(e)

    threads = [threading.Thread(target=slow) for _ in range(5)]
    for t in threads:
        t.start()
    wait_for("5 requests in their handler", lambda: notify_socket.count("STATUS=slow") == 5)
    p.terminate()
    for t in threads:
        t.join(10)
    assert results == [200] * 5
    assert p.wait() == 0
    assert "STOPPING=1" in notify_socket.assignments()


@needs_activate
def test_watchdog_pings_stop_when_the_loop_hangs(procs, app_script, notify_socket):
    # WATCHDOG_USEC=400ms: pings every ~200ms from the event loop
    p, port = start_activated(procs, app_script, "asyncio", notify_socket, WATCHDOG_USEC="400000")
    wait_for("3 watchdog pings", lambda: len(notify_socket.times("WATCHDOG=1")) >= 3)
    hang = threading.Thread(
        target=lambda: ignore_errors(request, port, "/hang", timeout=3), daemon=True
    )
    hang.start()
    notify_socket.wait_for("STATUS=hang")
    # the handler blocks the loop: nothing pings after it began; over 1.2 s (six
    # intervals) a healthy worker would ping 6 times
    holds_for(
        "no ping after the hang began",
        lambda: "WATCHDOG=1" not in notify_socket.after("STATUS=hang"),
        1.2,
    )


@needs_activate
def test_watchdog_pid_of_another_process_disables_pings(procs, app_script, notify_socket):
    start_activated(
        procs, app_script, "asyncio", notify_socket, WATCHDOG_USEC="200000", WATCHDOG_PID="1"
    )
    # WATCHDOG_USEC=200ms: a worker that pinged would ping about 5 times in 1 s
    holds_for("no watchdog ping", lambda: notify_socket.times("WATCHDOG=1") == [], 1.0)


def test_development_mode_binds_itself(procs, app_script, notify_socket):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "CLUSTERKIT_"))}
    env["NOTIFY_SOCKET"] = notify_socket.path
    p = Proc([PYTHON, str(app_script), "asyncio", f"127.0.0.1:{port}"], env=env)
    procs.append(p)
    status, _, body = request(port, "/info", retry_refused=10.0)
    info = json.loads(body)
    assert info["activated"] is False and info["sockets"] == []
    assert info["is_worker"] is False and info["unit"] is None and info["id"] == 0
    assert info["name"] == "server"
    assert listening_inodes(p.pid) == {str(info["fd"])}
    p.terminate()
    assert p.wait() == 0


def test_listen_pid_of_another_process_is_ignored(procs, app_script):
    # a socket on fd 3 with LISTEN_* meant for another pid: not ours, leave it alone
    decoy = socket.create_server(("127.0.0.1", 0))
    port = free_port()
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID="1", LISTEN_FDNAMES="http")
    env.pop("CLUSTERKIT_WORKER_ID", None)
    p = with_socket_as_fd3(
        decoy, [PYTHON, str(app_script), "asyncio", f"127.0.0.1:{port}"], env=env
    )
    decoy.close()
    procs.append(p)
    info = json.loads(request(port, "/info", retry_refused=10.0)[2])
    assert info["activated"] is False and info["sockets"] == [] and info["fd"] != 3


@needs_activate
def test_several_passed_sockets_pick_by_address(tmp_path, app_script):
    port, other = free_port(), free_port()
    path = str(tmp_path / "x.sock")
    argv = [
        ACTIVATE,
        "-l",
        f"127.0.0.1:{port}",
        "-l",
        path,
        "--fdname=http:http",
        "-ECLUSTERKIT_WORKER_ID=0",
        PYTHON,
        str(app_script),
        "listen",
        "-",
        str(port),
        path,
        str(other),
        f"127.0.0.1:{port}",
    ]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:  # the first connection makes systemd-socket-activate exec the script
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        out, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    result = json.loads(out.strip().splitlines()[-1])
    assert result[str(port)] == 3
    assert result[path] == 4
    assert result[f"127.0.0.1:{port}"] == 3
    assert result[str(other)].startswith("error:") and "none of which matches" in result[str(other)]
    assert "several sockets" in result["-"]


def test_worker_identity_from_unit_environment():
    from clusterkit.worker import ThisWorker as Worker

    w = Worker({"CLUSTERKIT_WORKER_ID": "2", "CLUSTERKIT_NAME": "hello", "INVOCATION_ID": "ab12"})
    assert (w.id, w.name, w.unit, w.invocation_id, w.pid) == (
        2,
        "hello",
        "hello@2.service",
        "ab12",
        os.getpid(),
    )
    dev = Worker({})
    assert dev.id == 0 and dev.unit is None and dev.managed is False


def test_in_a_unit_without_a_socket_listen_raises():
    from clusterkit.worker import ThisWorker as Worker

    w = Worker({"CLUSTERKIT_WORKER_ID": "2", "CLUSTERKIT_NAME": "hello", "INVOCATION_ID": "ab12"})
    with pytest.raises(LookupError, match="without a listening socket"):
        w.listen(free_port())


def test_cluster_facade_in_worker_does_not_import_primary_or_heavy_modules():
    """A worker importing cluster never loads the primary, the journal reader, Jinja2, the CLI."""
    code = (
        "import sys\n"
        "from clusterkit import cluster\n"
        "assert cluster.is_worker and not cluster.is_primary and not cluster.is_master\n"
        "assert cluster.worker.id == 3 and cluster.worker.unit == 'hello@3.service'\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jinja2', 'asyncio', 'click')"
        " or m in ('clusterkit.primary', 'clusterkit.events', 'clusterkit.cli',"
        " 'clusterkit.render', 'clusterkit.spec', 'systemd.journal')]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, CLUSTERKIT_WORKER_ID="3", CLUSTERKIT_NAME="hello")
    subprocess.run([PYTHON, "-c", code], env=env, check=True, timeout=30)


def test_cluster_facade_in_primary():
    code = (
        "from clusterkit import cluster\n"
        "assert cluster.is_primary and cluster.is_master and not cluster.is_worker\n"
        "assert cluster.worker is None\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERKIT_WORKER_ID"}
    subprocess.run([PYTHON, "-c", code], env=env, check=True, timeout=30)


def test_notify_is_a_noop_outside_systemd(monkeypatch):
    from clusterkit import notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False and notify.watchdog() is False


def test_notify_sends_real_datagrams(monkeypatch, notify_socket):
    from clusterkit import notify
    from clusterkit.worker import ThisWorker as Worker

    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    w = Worker({})
    assert w.ready("up") is True
    w.ready()  # idempotent: no second READY=1
    w.status("busy\nreally")
    w.stopping()
    assert notify.watchdog() is True
    notify_socket.wait_for("WATCHDOG=1")
    lines = notify_socket.assignments()
    assert lines.count("READY=1") == 1
    assert "STATUS=up" in lines and "STATUS=busy really" in lines and "STOPPING=1" in lines
