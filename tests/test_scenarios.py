"""Integration scenarios (issue 4, item 2, a-k) on real systemd booted in a container.

Each test deploys a cluster rendered by ``clusterkit generate`` into a fresh
container (:mod:`tests.scenario`), in both scheduling modes where that matters,
and drives it with systemctl, the ``clusterkit`` CLI and Python primaries run
inside. Where the issue says "under load", a bounded :class:`scenario.Load`
sends requests from the container's network throughout, and the assertion
messages carry its summary (failed requests by outcome, per worker). Every wait
is a poll with a deadline; no assertion is about wall-clock durations.
"""

from __future__ import annotations

import json
import resource
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
from scenario import (
    APPS,
    MODES,
    PORT,
    PY,
    REFUSED,
    ROOT,
    Cluster,
    Lines,
    deploy,
    failures_only_in_flight,
    generate,
    has_journal_open,
    ids_of,
    inner_pid,
    install,
    load,
    run_in_netns,
    wait_for,
)

from clusterkit.container import Container, stop_process

VENV_BIN = Path(PY).parent
HELLO = ROOT / "examples" / "hello"
PRIMARY = f"{APPS / 'primary.py'}"


def answered_by_all(cl: Cluster, ids: set[str], timeout: float = 30) -> None:
    """Send requests until every worker in ``ids`` has answered one (under a short load)."""
    with load(cl, concurrency=4) as ld:
        wait_for(f"answers from workers {sorted(ids)}", lambda: ids <= ids_of(ld.samples), timeout)
    report = ld.stop()
    assert not report.failed(), report.summary()


def new_pid(cl: Cluster, k: int, old: int, timeout: float = 30) -> int:
    """Wait until worker ``k`` runs again, as a process other than ``old``; return its pid."""
    return wait_for(
        f"{cl.unit(k)} back with a new pid",
        lambda: cl.is_active(cl.unit(k)) and (pid := cl.main_pid(k)) not in (0, old) and pid,
        timeout,
    )


# -- a ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_workers_auto_one_per_cpu_port_held_by_pid1(
    container: Container, tmp_path: Path, mode: str
) -> None:
    """a: --workers auto runs one worker per CPU; PID 1 holds the port; every worker answers."""
    c = container
    cl = deploy(c, tmp_path, workers="auto", scheduling=mode)
    cpus = int(c.run("nproc", check=True).stdout)
    assert cl.running_ids() == list(range(cpus))

    listeners = c.run("ss", "-ltnpH", f"sport = :{PORT}", check=True).stdout.splitlines()
    assert len(listeners) == (1 if mode == "shared" else cpus), listeners
    assert all('("systemd",pid=1,' in line for line in listeners), listeners

    answered_by_all(cl, {str(k) for k in range(cpus)})


# -- b ------------------------------------------------------------------------------------


def test_seed_program_primary_forks_serves_and_sees_a_death(
    container: Container, tmp_path: Path
) -> None:
    """b: examples/hello's primary forks the workers, they serve, its exit handler sees a death."""
    c = container
    exec_line = f"{PY} {HELLO / 'cluster.py'}"
    files = generate(
        tmp_path / "units",
        "hello",
        exec_line,
        "--workers",
        "auto",
        "--working-directory",
        str(HELLO),
    )
    install(c, files)
    cl = Cluster(c, "hello")
    cpus = int(c.run(PY, "-c", "import os; print(os.cpu_count())", check=True).stdout)

    proc = c.popen("sh", "-c", f"cd {HELLO} && exec {PY} cluster.py", env={"PYTHONUNBUFFERED": "1"})
    try:
        out = Lines(proc)
        primary = inner_pid(proc)
        pids = cl.wait_active(range(cpus))
        for _ in range(cpus):
            assert cl.get().body == "hello world\n"
        # the primary follows the journal from "now": wait until it reads it
        wait_for("the primary to open the journal", lambda: has_journal_open(primary))
        assert proc.poll() is None, out.lines

        victim = pids[cpus - 1]
        c.systemctl("kill", "-s", "KILL", cl.unit(cpus - 1))
        wait_for(
            f"'worker {victim} died' from the primary", lambda: f"worker {victim} died" in out.lines
        )
        new_pid(cl, cpus - 1, victim)
        assert cl.get().body == "hello world\n"
    finally:
        stop_process(proc)


# -- c ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_under_load_loses_only_in_flight_requests(
    container: Container, tmp_path: Path, mode: str
) -> None:
    """c: SIGKILL under load: only in-flight requests fail; the exit event is seen twice."""
    c = container
    cl = deploy(c, tmp_path, scheduling=mode)
    watcher = c.popen(PY, PRIMARY, cl.name, str(time.time()), "120")
    concurrency = 8
    try:
        primary = Lines(watcher)
        with load(cl, concurrency=concurrency, pause=0) as ld:
            ld.wait_requests(200)
            # the busiest worker (shared mode favours one): the most requests in flight to lose
            k = int(Counter(s.worker for s in list(ld.samples) if s.ok).most_common(1)[0][0])
            victim = cl.main_pid(k)
            c.systemctl("kill", "-s", "KILL", cl.unit(k))
            killed = ld.mark("kill")
            new_pid(cl, k, victim)
            back = ld.mark("back")
            ld.wait_requests(300, sent_after=back)
            wait_for(
                f"the new worker {k} to answer",
                lambda: str(k) in ids_of([s for s in list(ld.samples) if s.sent >= back]),
            )
        report = ld.stop()

        in_flight = report.failed(sent_before=killed)
        why = failures_only_in_flight(report, killed, allowed=concurrency)
        assert why is None, f"{why}\n{report.summary()}"
        assert report.outcomes()[REFUSED] == 0, report.summary()
        print(f"[c/{mode}] {len(in_flight)} in-flight request(s) lost; {report.summary()}")

        event = cl.wait_exit("the exit event", lambda e: e["pid"] == victim)
        assert (event["worker"], event["code"], event["signal"]) == (k, None, "SIGKILL"), event
        assert event["exited_after_disconnect"] is False, event
        seen = wait_for(
            "the Python primary's exit handler",
            lambda: [e for e in primary.json() if e.get("pid") == victim],
        )
        assert seen == [
            {
                "worker": k,
                "pid": victim,
                "code": None,
                "signal": "SIGKILL",
                "exited_after_disconnect": False,
            }
        ]
    finally:
        stop_process(watcher)


# -- d ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_exit_codes_and_disconnect_are_reported(
    container: Container, tmp_path: Path, mode: str
) -> None:
    c = container
    cl = deploy(c, tmp_path, scheduling=mode)
    since = time.time()

    for status in (3, 0):
        r = cl.get(f"/exit/{status}")
        assert r.ok and r.worker is not None, r
        pid = int(r.body.split()[1])
        event = cl.wait_exit(f"exit {status} of pid {pid}", lambda e, pid=pid: e["pid"] == pid)
        assert (event["worker"], event["code"], event["signal"]) == (int(r.worker), status, None), (
            event
        )
        assert event["exited_after_disconnect"] is False, event
        new_pid(cl, int(r.worker), pid)

    old = cl.main_pid(1)
    r = c.run(
        PY, PRIMARY, cl.name, str(since), "30", "--disconnect", "1", "--exits", "3", timeout=60
    )
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line]
    assert '{"disconnected": 1, "exited_after_disconnect": true}' in lines, r.stdout
    exits = [json.loads(line) for line in lines if '"pid"' in line]
    assert [(e["code"], e["signal"], e["exited_after_disconnect"]) for e in exits] == [
        (3, None, False),
        (0, None, False),
        (0, None, True),
    ], exits
    assert exits[-1]["worker"] == 1 and exits[-1]["pid"] == old
    event = cl.wait_exit("the disconnect's exit event", lambda e: e["pid"] == old)
    assert event["exited_after_disconnect"] is True and event["code"] == 0, event
    assert not cl.is_active(cl.unit(1))
    if mode == "reuseport":  # its socket is stopped too: nothing queues for a worker that is gone
        assert not cl.is_active(cl.socket_unit(1))
    assert cl.get().worker == "0"


# -- e ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_all_workers_stopped_socket_activation_serves(
    container: Container, tmp_path: Path, mode: str
) -> None:
    """e: with every worker stopped, traffic starts one by socket activation; none refused."""
    c = container
    cl = deploy(c, tmp_path, scheduling=mode)
    c.systemctl("stop", cl.unit(0), cl.unit(1))
    assert cl.running_ids() == []
    assert all(cl.is_active(cl.socket_unit(k)) for k in (0, 1))

    first = cl.get(timeout=30)  # connects while no worker runs
    assert first.ok, first
    started = int(first.worker or -1)
    # shared: the socket's Service= is NAME@0; reuseport: the socket the kernel hashed it to
    assert started == 0 if mode == "shared" else started in (0, 1)
    # active once it has sent READY=1 (it may serve first)
    wait_for(f"worker {started} active", lambda: cl.running_ids() == [started])

    with load(cl, concurrency=4) as ld:
        ld.wait_requests(300)
        if mode == "reuseport":  # traffic hashed to the other socket revives its worker too
            wait_for("both workers revived by traffic", lambda: ids_of(ld.samples) == {"0", "1"})
    report = ld.stop()
    assert not report.failed(), report.summary()
    print(f"[e/{mode}] {report.summary()}")
    assert cl.running_ids() == ([0] if mode == "shared" else [0, 1])


# -- f ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_reload_under_load_replaces_every_worker(
    container: Container, tmp_path: Path, mode: str
) -> None:
    """f: clusterkit reload under load replaces every worker with no failed request."""
    c = container
    cl = deploy(c, tmp_path, scheduling=mode)
    before = {k: cl.invocation_id(k) for k in (0, 1)}
    with load(cl, concurrency=4) as ld:
        ld.wait_requests(200)
        ld.mark("reload")
        out = cl.ck("reload", cl.name).stdout
        done = ld.mark("reloaded")
        ld.wait_requests(300, sent_after=done)
    report = ld.stop()
    after = {k: cl.invocation_id(k) for k in (0, 1)}
    assert all(after[k] and after[k] != before[k] for k in (0, 1)), (before, after, out)
    assert not report.failed(), report.summary()
    assert ids_of(report.select(sent_after=done)) == {"0", "1"}, report.summary()
    print(f"[f/{mode}] {report.summary()}")


# -- g ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_port_80_with_dynamic_user_workers(container: Container, tmp_path: Path, mode: str) -> None:
    """g: port 80 with DynamicUser= workers: they run unprivileged and serve."""
    c = container
    cl = deploy(c, tmp_path, scheduling=mode, port=80)
    for k in (0, 1):
        assert cl.show(cl.unit(k), "DynamicUser")["DynamicUser"] == "yes"
        status = c.run("cat", f"/proc/{cl.main_pid(k)}/status", check=True).stdout
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert "0" not in uids, status
    listeners = c.run("ss", "-ltnpH", "sport = :80", check=True).stdout
    assert '("systemd",pid=1,' in listeners, listeners
    answered_by_all(cl, {"0", "1"})


# -- h ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_hung_worker_killed_by_watchdog_and_restarted(
    container: Container, tmp_path: Path, mode: str
) -> None:
    """h: a worker whose loop hangs is killed by the watchdog (SIGABRT) and restarted."""
    c = container
    cl = deploy(c, tmp_path, "--watchdog-sec", "2", scheduling=mode)
    pids = {k: cl.main_pid(k) for k in (0, 1)}
    hang = cl.get("/hang", timeout=1)  # never answered: the loop sleeps in the handler
    assert not hang.ok, hang

    event = cl.wait_exit("a watchdog exit", lambda e: e["service_result"] == "watchdog")
    k = int(event["worker"])  # type: ignore[arg-type]
    assert event["pid"] == pids[k], (event, pids)
    assert (event["code"], event["signal"], event["exited_after_disconnect"]) == (
        None,
        "SIGABRT",
        False,
    ), event
    new_pid(cl, k, pids[k])
    assert cl.main_pid(1 - k) == pids[1 - k]  # the other worker was left alone
    answered_by_all(cl, {"0", "1"})


# -- i ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_crash_looping_worker_others_serve_port_stays_open(
    container: Container, tmp_path: Path, mode: str
) -> None:
    """i: one worker crash-loops under load: the others serve, the port never closes.

    shared: no start limit, so the shared socket never fails; nothing fails at all.
    reuseport: the looping worker's own socket must not keep taking connections
    nobody serves: after its start limit (5 starts in 30s) systemd fails
    NAME@1.socket, which leaves the SO_REUSEPORT group; from then on nothing fails.
    """
    c = container
    cl = deploy(c, tmp_path, scheduling=mode)
    states: set[str] = set()

    def shared_cycles() -> bool:
        states.add(f"{cl.socket_unit(0)}={cl.state(cl.socket_unit(0))}")
        return int(cl.show(cl.unit(1), "NRestarts")["NRestarts"]) >= 4

    def looping_socket_closed() -> bool:
        return cl.state(cl.socket_unit(1)).startswith("failed")

    with load(cl, concurrency=4, timeout=5) as ld:
        ld.wait_requests(200)
        c.write_file("/run/ck-crash/1", "")
        c.systemctl("kill", "-s", "TERM", cl.unit(1))  # a clean exit; its restarts crash at start
        looping = ld.mark("crash-loop")
        if mode == "shared":
            wait_for("4 restarts of the crash-looping worker", shared_cycles, timeout=60)
            settled = looping
        else:
            wait_for("the looping worker's socket to close", looping_socket_closed, timeout=60)
            settled = ld.mark("socket closed")
            ld.wait_requests(200, sent_after=settled)
        assert cl.is_active(cl.unit(0)) and cl.is_active(cl.socket_unit(0))
    report = ld.stop()
    print(f"[i/{mode}] {report.summary()}")
    assert report.workers(sent_after=looping)["0"] >= 100, report.summary()
    assert not report.failed(sent_after=settled), report.summary()
    if mode == "shared":
        assert all(
            st.endswith("=active/listening") or st.endswith("=active/running") for st in states
        ), states
        assert not report.failed(), report.summary()
    crashes = [e for e in cl.events("exit") if e["worker"] == 1 and e["code"] == 1]
    assert len(crashes) >= 3, crashes

    c.run("rm", "/run/ck-crash/1", check=True)  # the fix is deployed
    if mode == "reuseport":  # a given-up instance comes back when asked to
        assert cl.ck("fork", cl.name).returncode == 0
    cl.wait_active([1])
    answered_by_all(cl, {"0", "1"})


# -- j ------------------------------------------------------------------------------------

STOCK = {
    "uvicorn": (f"{VENV_BIN / 'uvicorn'} --fd 3 asgi_app:app", ["--type", "exec"]),
    "gunicorn": (f"{VENV_BIN / 'gunicorn'} --workers 1 wsgi_app:app", []),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("server", sorted(STOCK))
def test_stock_servers_serve_unmodified(
    container: Container, tmp_path: Path, server: str, mode: str
) -> None:
    """j: stock uvicorn (--fd 3) and gunicorn (LISTEN_FDS) serve under clusterkit units."""
    c = container
    exec_line, options = STOCK[server]
    cl = deploy(
        c,
        tmp_path,
        *options,
        "--working-directory",
        str(APPS),
        exec_line=exec_line,
        scheduling=mode,
    )
    answered_by_all(cl, {"0", "1"})
    assert cl.get().body in (f"{server} 0\n", f"{server} 1\n")


# -- k ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_default_hardened_units_run_the_example(
    container: Container, tmp_path: Path, mode: str
) -> None:
    """k: the default hardened units run the example; systemd-analyze security passes."""
    c = container
    # The attacker's best case: a kernel tunable anyone may write (nspawn's /sys is
    # read-only, a host's is not). A tmpfs over /sys/kernel/mm holding a mode-0666 file
    # stands in for it; only the units' sandbox can keep the worker from writing it.
    c.run("mount", "-t", "tmpfs", "-o", "mode=0755", "planted", PLANTED_TUNABLES, check=True)
    c.write_file(f"{PLANTED_TUNABLES}/enabled", "always\n", mode=0o666)
    cl = deploy(c, tmp_path, exec_line=f"{PY} {HELLO / 'server.py'}", scheduling=mode)
    unit_text = c.run("systemctl", "cat", cl.unit(0), check=True).stdout
    assert "ProtectSystem=strict" in unit_text and "DynamicUser=yes" in unit_text
    for k in (0, 1):
        status = c.run("cat", f"/proc/{cl.main_pid(k)}/status", check=True).stdout
        assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status, status
        assert_kernel_tunables_out_of_reach(c, cl.main_pid(k))
    for _ in range(4):
        r = cl.get()
        assert r.ok and r.body == "hello world\n", r
    r = c.run("systemd-analyze", "security", "--offline=yes", "--threshold=20", cl.unit(0))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr


PLANTED_TUNABLES = "/sys/kernel/mm"


def assert_kernel_tunables_out_of_reach(c: Container, pid: int) -> None:
    """What ProtectKernelTunables=yes promises, seen from the worker's own mount namespace
    (the units get it from ReadOnlyPaths=/sys and ProcSubset=pid, see templates/hardening.j2):
    /sys and every mount below it read-only, /proc without /proc/sys and its siblings, and a
    write to a world-writable tunable, made as the worker's uid in its namespaces, refused."""
    mounts = {}
    for line in c.run("cat", f"/proc/{pid}/mountinfo", check=True).stdout.splitlines():
        fields = line.split()
        mounts[fields[4]] = fields[5].split(",") + fields[fields.index("-") + 3].split(",")
    under_sys = {path: opts for path, opts in mounts.items() if path.split("/")[1] == "sys"}
    assert "/sys" in under_sys and all("ro" in opts for opts in under_sys.values()), under_sys
    assert "subset=pid" in mounts["/proc"], mounts["/proc"]
    for hidden in ("sys", "sysrq-trigger", "kcore", "kallsyms"):
        r = c.run("test", "-e", f"/proc/{pid}/root/proc/{hidden}")
        assert r.returncode == 1, f"/proc/{hidden} is visible to worker pid {pid}"
    uid = c.run("stat", "-c", "%u", f"/proc/{pid}", check=True).stdout.strip()
    tunable = f"{PLANTED_TUNABLES}/enabled"
    r = c.run(
        "nsenter", "--all", "-t", str(pid), "-S", uid, "-G", uid,
        "sh", "-c", f"echo never > {tunable}",
    )  # fmt: skip
    assert r.returncode != 0 and "Read-only file system" in r.stderr, (r.returncode, r.stderr)


# -- worker logs ---------------------------------------------------------------------------


def test_worker_logs_reach_the_journal_with_the_worker_id(
    container: Container, tmp_path: Path
) -> None:
    """The serving path logs through clusterkit.log: one journal field says which worker."""
    cl = deploy(container, tmp_path)
    for k in (0, 1):
        pid = cl.main_pid(k)

        def logged(k: int = k, pid: int = pid) -> list[dict[str, object]]:
            return [
                e
                for e in container.journal(f"CLUSTERKIT_WORKER_ID={k}", f"_PID={pid}")
                if "serving on" in str(e.get("MESSAGE"))
            ]

        record = wait_for(f"worker {k}'s log record", logged)[0]
        assert record["CLUSTERKIT_NAME"] == cl.name
        assert record["_SYSTEMD_UNIT"] == cl.unit(k)


# -- a client holding connections open -------------------------------------------------------


def test_connections_held_open_do_not_lock_out_other_clients(
    container: Container, tmp_path: Path
) -> None:
    """One client opens more connections to a worker than its open-file limit (systemd's
    LimitNOFILE=, 1024 by default) lets it hold, and sends nothing. A new client is still
    served: each new connection closes the worker's oldest one with no response in
    progress (serve_asyncio's max_connections), and the worker logs it."""
    cl = deploy(container, tmp_path, workers=1)
    (k,) = cl.running_ids()
    nofile = int(cl.show(cl.unit(k), "LimitNOFILESoft")["LimitNOFILESoft"])
    hogs = nofile + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hogs + 256:  # this test's own sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, hogs + 256), hard))

    def open_hogs() -> list[socket.socket]:
        return [socket.create_connection(("127.0.0.1", cl.port), timeout=5) for _ in range(hogs)]

    held: list[socket.socket] = run_in_netns(container.pid, open_hogs)  # type: ignore[assignment]
    try:
        for _ in range(3):
            sample = cl.get()
            assert sample.ok, (sample.outcome, sample.error)
        wait_for(
            "the worker's log of the connections it closed",
            lambda: [
                e
                for e in container.journal(f"_SYSTEMD_UNIT={cl.unit(k)}")
                if "to make room" in str(e.get("MESSAGE"))
            ],
        )
        assert cl.main_pid(k)  # the same worker, still running
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
