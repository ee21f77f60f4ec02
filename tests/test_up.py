"""clusterkit up, the README's main job: run as a user would, then Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterkit.container import _child_named
from clusterkit.manager import up_manager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nspawn_machines() -> set[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return set(re.findall(r"systemd-nspawn .*--machine=(\S+)", out))


def start_up(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """Start `clusterkit up ARGS`; its output lines until it serves (or fails)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "clusterkit.cli", "up", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "[4/4] serving" in line or "clusterkit up:" in line:
            break
    return proc, lines


@pytest.mark.usefixtures("containers_available")
def test_up_serves_the_example_from_every_cpu_and_stops_on_ctrl_c() -> None:
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("systemd is PID 1 here: up would install into the host")
    port = free_port()
    before = nspawn_machines()
    # An operator's drop-in, where it would go on a server: up applies it too.
    dropin_dir = Path("/etc/systemd/system/hello@.service.d")
    made_dir = not dropin_dir.exists()
    dropin_dir.mkdir(parents=True, exist_ok=True)
    dropin = dropin_dir / "50-up-test.conf"
    dropin.write_text("[Service]\nEnvironment=CK_FROM_DROPIN=seen\n")
    proc, lines = start_up("--listen", str(port))
    try:
        output = "".join(lines)
        assert "[4/4] serving" in output, output
        assert "drop-in(s) from /etc/systemd/system: hello@.service.d/50-up-test.conf" in output
        running = up_manager("hello")
        assert running is not None
        assert "CK_FROM_DROPIN=seen" in running.systemctl("cat", "hello@0.service")
        ready = re.findall(r"worker (\d+) \(pid \d+\) is ready", output)
        assert sorted(map(int, ready)) == list(range(len(os.sched_getaffinity(0))))
        bodies = set()
        for _ in range(20):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                assert response.status == 200
                bodies.add(response.read())
        assert bodies == {b"hello world\n"}
        # Another shell manages the running cluster by its name alone.
        status = other_shell("status", "hello", "--json")
        assert status.returncode == 0, status.stderr
        workers = json.loads(status.stdout)
        assert [w["state"] for w in workers] == ["listening"] * len(ready)
        assert "worker 0 is listening" in other_shell("events", "hello").stdout
        reload = other_shell("reload", "hello")
        assert reload.returncode == 0 and f"reloaded {len(ready)} workers" in reload.stdout
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        dropin.unlink()
        if made_dir:
            dropin_dir.rmdir()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert "stopped hello" in output and "powering off" in output, output
    assert nspawn_machines() <= before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert other_shell("status", "hello").returncode == 4  # gone with its container


def other_shell(*args: str) -> subprocess.CompletedProcess[str]:
    """``clusterkit ARGS`` from another process, in another directory."""
    return subprocess.run(
        [sys.executable, "-m", "clusterkit.cli", *args], capture_output=True, text=True, cwd="/"
    )


def run_up(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clusterkit.cli", "up", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.usefixtures("containers_available")
def test_up_says_when_the_port_is_taken_and_boots_nothing() -> None:
    before = nspawn_machines()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = run_up("--listen", f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert f"--listen 127.0.0.1:{port}: already in use" in r.stdout
    assert "[2/4]" not in r.stdout
    assert nspawn_machines() <= before


@pytest.mark.usefixtures("containers_available")
def test_up_shows_why_a_worker_keeps_failing_before_powering_off() -> None:
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("systemd is PID 1 here: up would install into the host")
    before = nspawn_machines()
    app = Path(__file__).resolve().parent / "apps" / "broken.py"
    r = run_up(
        "--name", "broken", "--exec", f"{sys.executable} {app}", "--listen", str(free_port())
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "broken@" in r.stdout and "keeps failing" in r.stdout
    assert "| RuntimeError: this worker cannot start" in r.stdout
    # the app's text is shown, never obeyed (clusterkit.terminal)
    assert "| pwned\\x1b]52;c;cm0gLXJmIC8K\\x07" in r.stdout, r.stdout
    # journald itself starts a new record after the CR
    assert "\\u2028      worker 0 (pid 1) is ready" in r.stdout, r.stdout
    assert all(ch.isprintable() or ch == "\n" for ch in r.stdout), r.stdout
    assert "powering off" in r.stdout
    assert nspawn_machines() <= before


TEST_ADDRESS = "198.18.0.77"  # a non-loopback address of the host (benchmarking range)


@pytest.fixture
def host_address() -> Iterator[str]:
    """A veth pair on the host, one end holding TEST_ADDRESS; removed afterwards."""
    link = f"ckt{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", f"{link}p"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{TEST_ADDRESS}/32", "dev", link], check=True)
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        subprocess.run(["ip", "link", "set", f"{link}p", "up"], check=True)
        yield TEST_ADDRESS
    finally:
        subprocess.run(["ip", "link", "del", link], check=False)


def container_pid1(output: str) -> int:
    """The PID 1 (as the host sees it) of the container ``up`` said it booted."""
    machine = re.search(r"container (\S+) is up", output)
    assert machine, output
    ps = subprocess.run(["ps", "-ewwo", "pid=,args="], capture_output=True, text=True).stdout
    nspawn = next(
        int(line.split()[0])
        for line in ps.splitlines()
        if "systemd-nspawn" in line and f"--machine={machine.group(1)}" in line
    )
    return _child_named(nspawn, "systemd")


@pytest.mark.usefixtures("containers_available")
def test_up_listens_on_loopback_only_and_binds_the_checkout_read_only(host_address: str) -> None:
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("systemd is PID 1 here: up would install into the host")
    port = free_port()
    proc, lines = start_up("--listen", str(port))
    try:
        output = "".join(lines)
        assert "[4/4] serving" in output, output
        assert f"--listen {port} means 127.0.0.1:{port} under up" in output
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert response.status == 200
        with pytest.raises(OSError):
            socket.create_connection((host_address, port), timeout=2).close()

        checkout = Path(__file__).resolve().parent.parent
        probe = checkout / f".up-write-probe-{os.getpid()}"
        r = subprocess.run(
            ["nsenter", "--all", "-t", str(container_pid1(output)), "touch", str(probe)],
            capture_output=True,
            text=True,
        )
        written = probe.exists()
        probe.unlink(missing_ok=True)
        assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
        assert not written
    finally:
        stop_up(proc)


def stop_up(proc: subprocess.Popen[str]) -> None:
    """SIGTERM first: up powers its container off; SIGKILL only if it hangs."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_up_refuses_a_python_the_container_cannot_see(tmp_path: Path) -> None:
    python = tmp_path / "pyenv" / "bin" / "python3"  # as a pyenv or /opt Python would be
    python.parent.mkdir(parents=True)
    shutil.copy("/bin/true", python)
    assert "/usr/bin/python3 -m venv" in up_refusal("elsewhere", f"{python} -m http.server")


def up_refusal(name: str, exec_line: str) -> str:
    """The one line with which `clusterkit up` refuses this app, having booted nothing."""
    before = nspawn_machines()
    r = subprocess.run(
        [sys.executable, "-m", "clusterkit.cli", "up", "--name", name]
        + ["--exec", exec_line, "--listen", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    refusal = [line for line in r.stdout.splitlines() if line.startswith("clusterkit up:")]
    assert len(refusal) == 1, r.stdout
    assert "booting" not in r.stdout and nspawn_machines() <= before
    return refusal[0]


def test_up_refuses_an_app_path_nspawn_would_split(tmp_path: Path) -> None:
    """nspawn reads --bind-ro=SRC[:DST[:OPTIONS]]: an app directory with a ':' in its path
    would be bound somewhere else, with options taken from its name. Refused, nothing boots."""
    app = tmp_path / "app:/etc:rw"
    app.mkdir(parents=True)
    shutil.copy("/bin/true", app / "serve")
    assert "has a ':' in its path" in up_refusal("split", str(app / "serve"))
