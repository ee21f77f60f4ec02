"""The app's user attacks: nothing it can write ever runs as root, and exits are still reported.

Real systemd in a container. The app's user owns its working directory and its
venv; the worker is the attacker. At start it plants code in every place that
user can write and that a Python or a dynamic loader might pick up (a
``clusterkit`` package and ``sitecustomize`` in its working directory, a
``.pth`` file in its venv, a ``PYTHONPATH`` directory, programs on a ``PATH``
it sets, an ``LD_PRELOAD`` library), each set through ``--env``, ``clusterkit
fork --env`` or an ``EnvironmentFile=`` it can edit. Every payload records the
uid it ran as in a world-writable directory. After workers are killed and
stopped, no payload may have run as uid 0, and the exit events must be right.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from scenario import APPS, ck, deploy, wait_for

from clusterkit.container import Container
from clusterkit.report import UNIT_FAILED

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
APP_UID = 1001
MARKERS = "/run/ck-markers"
SITE = "/srv/app/venv/lib/python3.11/site-packages"

PAYLOAD = (
    "import os\n"
    "try:\n"
    "    open(f'" + MARKERS + "/{TAG}-{os.getuid()}', 'w').close()\n"
    "except OSError:\n"
    "    pass\n"
)
SHIM = "#!/bin/sh\ntouch " + MARKERS + "/path-$(id -u) 2>/dev/null\n"
PRELOAD_C = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void plant(void) {
    char path[128];
    snprintf(path, sizeof path, "%s/ld_preload-%d", MARKERS, (int)getuid());
    FILE *f = fopen(path, "w");
    if (f) fclose(f);
}
"""

# The attacker: plants payloads wherever its user can write, then serves.
WORKER = r"""
import os, sys
PAYLOAD = __PAYLOAD__
SHIM = __SHIM__

def plant(path, text, mode=0o644):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
    except OSError:
        pass

cwd = os.getcwd()
plant(f"{cwd}/clusterkit/__init__.py", PAYLOAD.replace("{TAG}", "cwd_package"))
plant(f"{cwd}/clusterkit/report.py", PAYLOAD.replace("{TAG}", "cwd_report"))
plant(f"{cwd}/sitecustomize.py", PAYLOAD.replace("{TAG}", "cwd_sitecustomize"))
site = __SITE__
plant(f"{site}/0-evil.pth", "import os; exec(" + repr(PAYLOAD.replace("{TAG}", "pth")) + ")\n")
plant(f"{site}/sitecustomize.py", PAYLOAD.replace("{TAG}", "venv_sitecustomize"))
for d in ("/srv/app/pythonpath", "/srv/app/pythonpath2"):
    plant(f"{d}/sitecustomize.py", PAYLOAD.replace("{TAG}", "pythonpath"))
for prog in ("systemctl", "systemd-cat", "echo", "python3", "journalctl"):
    plant(f"/srv/app/bin/{prog}", SHIM, 0o755)

sys.path.insert(0, __APPS__)
from shim_worker import serve
serve(lambda conn: None, 3000)
"""


def _worker_script() -> str:
    return (
        WORKER.replace("__PAYLOAD__", repr(PAYLOAD))
        .replace("__SHIM__", repr(SHIM))
        .replace("__SITE__", repr(SITE))
        .replace("__APPS__", repr(str(APPS)))
    )


@pytest.fixture(scope="module")
def preload_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the LD_PRELOAD payload (bash dev test installs it)")
    d = tmp_path_factory.mktemp("preload")
    (d / "evil.c").write_text(PRELOAD_C)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f'-DMARKERS="{MARKERS}"', "-o", d / "evil.so", d / "evil.c"],
        check=True,
    )
    return d / "evil.so"


def _set_up_app(c: Container, preload: Path) -> None:
    """The app's user, owning /srv/app and a venv there that can import clusterkit."""
    c.run("useradd", "-u", str(APP_UID), "-d", "/srv/app", "-M", "app", check=True)
    c.run("mkdir", "-p", "/srv/app", MARKERS, check=True)
    c.run("chmod", "1777", MARKERS, check=True)
    c.run("/usr/bin/python3", "-m", "venv", "/srv/app/venv", check=True)
    checkout_site = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"))
    c.write_file(f"{SITE}/checkout.pth", f"{ROOT}\n{checkout_site}\n")
    c.write_file("/srv/app/code/worker.py", _worker_script())
    shutil.copy(preload, f"/proc/{c.pid}/root/srv/app/evil.so")
    c.write_file(
        "/srv/app/env",
        "LD_PRELOAD=/srv/app/evil.so\nPYTHONPATH=/srv/app/pythonpath\nPATH=/srv/app/bin:/usr/bin\n",
    )
    c.run("chown", "-R", f"{APP_UID}:{APP_UID}", "/srv/app", check=True)


def _exits(c: Container) -> list[tuple[int, int | None, str | None, bool]]:
    lines = ck(c, "events", "t", "--json", check=False).stdout.splitlines()
    return [
        (e["worker"], e["code"], e["signal"], e["exited_after_disconnect"])
        for e in map(json.loads, lines)
        if e["event"] == "exit"
    ]


def _markers(c: Container) -> dict[str, int]:
    """Payload name -> the uid it ran as."""
    d = Path(f"/proc/{c.pid}/root{MARKERS}")
    return {p.name: p.stat().st_uid for p in d.iterdir()}


@pytest.mark.parametrize(
    "sandbox",
    [
        pytest.param(("--hardening", "none", "--working-directory", "/srv/app"), id="no-sandbox"),
        pytest.param(("--working-directory", "/var/lib/t"), id="sandbox-with-state-directory"),
    ],
)
def test_planted_code_never_runs_as_root_and_exits_are_reported(
    container: Container, tmp_path: Path, preload_library: Path, sandbox: tuple[str, ...]
) -> None:
    c = container
    _set_up_app(c, preload_library)
    out = tmp_path / "units"
    generate = [PY, "-m", "clusterkit.cli", "generate", "--name", "t", "--workers", "2"]
    generate += ["--exec", "/srv/app/venv/bin/python /srv/app/code/worker.py", "--run-as", "app"]
    generate += ["--env", "PYTHONPATH=/srv/app/pythonpath", "--env", "PATH=/srv/app/bin:/usr/bin"]
    generate += ["--env", "LD_PRELOAD=/srv/app/evil.so", "--output", str(out), *sandbox]
    subprocess.run(generate, check=True, cwd=tmp_path)
    c.install_units(sorted(out.iterdir()))
    # What an operator adds by a drop-in: an env file the app can edit, and (in the
    # sandbox) the README's relaxations: a state directory, writable app and markers.
    c.write_file(
        "/run/systemd/system/t@.service.d/50-operator.conf",
        "[Service]\nEnvironmentFile=/srv/app/env\nStateDirectory=t\n"
        f"ReadWritePaths=/srv/app {MARKERS}\n",
    )
    c.systemctl("daemon-reload")
    c.systemctl("start", "t.target")
    for i in (0, 1):
        wait_for(f"t@{i} active", lambda i=i: _active(c, f"t@{i}.service"))

    c.systemctl("kill", "-s", "KILL", "t@0.service")
    wait_for("worker 0's exit", lambda: _exits(c) == [(0, None, "SIGKILL", False)])
    c.systemctl("stop", "t@1.service")
    ck(c, "fork", "t", "--env", "PYTHONPATH=/srv/app/pythonpath2")
    c.systemctl("kill", "-s", "KILL", "t@1.service")
    wait_for("three exits", lambda: len(_exits(c)) == 3)
    assert _exits(c) == [
        (0, None, "SIGKILL", False),
        (1, 0, None, True),
        (1, None, "SIGKILL", False),
    ]

    markers = _markers(c)
    as_root = sorted(name for name, uid in markers.items() if uid == 0)
    assert as_root == [], f"planted code ran as root: {as_root}"
    # the payloads were live: the worker's own processes ran them, as the app's user
    assert any(uid == APP_UID for uid in markers.values()), markers
    assert {"ld_preload-1001", "pythonpath-1001", "pth-1001"} <= set(markers), markers


def _active(c: Container, unit: str) -> bool:
    return c.systemctl("is-active", unit, check=False).stdout.strip() == "active"


# The flood is of lines at the unit's own level, shaped like its pid line ("<5>" sets the
# level): the unit's line, the run's first, still names the pid, and a reader stops there.
FLOOD = r"""
import signal, sys, threading
from clusterkit import cluster

def flood_then_exit(sig, frame):
    for i in range(100_000):
        sys.stdout.write(f"<5>clusterkit: started pid={i + 2}\n")
    sys.stdout.flush()
    sys.exit(0)

stop = threading.Event()
signal.signal(signal.SIGUSR1, flood_then_exit)
signal.signal(signal.SIGTERM, lambda s, f: stop.set())
sock = cluster.worker.listen(3000)
cluster.worker.ready()
if cluster.worker.id == 1:  # floods until it is stopped
    i = 0
    while not stop.is_set():
        print(f"<5>clusterkit: started pid={i + 2}")
        i += 1
else:
    stop.wait()
"""


def test_exit_events_survive_a_worker_flooding_the_journal(
    container: Container, tmp_path: Path
) -> None:
    c = container
    c.write_file("/srv/flood.py", FLOOD)
    out = tmp_path / "units"
    subprocess.run(
        [PY, "-m", "clusterkit.cli", "generate", "--name", "t", "--workers", "2"]
        + ["--exec", f"{PY} /srv/flood.py", "--output", str(out)],
        check=True,
        cwd=tmp_path,
    )
    c.install_units(sorted(out.iterdir()))
    c.systemctl("start", "t.target")
    for i in (0, 1):
        wait_for(f"t@{i} active", lambda i=i: _active(c, f"t@{i}.service"))
    pids = [int(c.systemctl("show", "-P", "MainPID", f"t@{i}.service").stdout) for i in (0, 1)]
    c.systemctl("kill", "-s", "USR1", "t@0.service")  # 100,000 lines, then exit 0
    c.systemctl("stop", "t@1.service")  # a requested stop in the middle of a flood
    found = wait_for("both exits", lambda: (e := _exits(c)) and len(e) == 2 and e)
    assert sorted(found) == [(0, 0, None, False), (1, 0, None, True)]
    events = map(json.loads, ck(c, "events", "t", "--json").stdout.splitlines())
    # each worker's pid, in no order: which worker forks first is PID 1's business
    assert sorted(e["pid"] for e in events if e["event"] == "exit") == sorted(pids)
    suppressed = c.run("journalctl", "-o", "cat", "--no-pager", "-u", "systemd-journald").stdout
    print("journald:", [line for line in suppressed.splitlines() if "Suppressed" in line])


# The attacker against PID 1's own records: a child of the worker (not its main process)
# floods $NOTIFY_SOCKET; PID 1 logs a warning for each datagram ("reception only permitted
# for main PID"), and journald's rate limit for init.scope then drops PID 1's records of
# every unit, exits of other clusters included. Bounded: 15 s or 200,000 datagrams at most.
NOTIFY_FLOOD = r"""
import os, signal, socket, time
from systemd import daemon

def flood(signum, frame):
    if os.fork():
        return
    address = os.environ["NOTIFY_SOCKET"].replace("@", "\0", 1)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deadline = time.monotonic() + 15
    for i in range(200_000):
        s.sendto(b"STATUS=x", address)
        if i == 3000:
            open("/run/ck-flood/flooding", "w").close()
        if os.path.exists("/run/ck-flood/stop") or time.monotonic() > deadline:
            break
    os._exit(0)

signal.signal(signal.SIGUSR1, flood)
daemon.notify("READY=1")
while True:
    signal.pause()
"""

# A forger of journald's own record that it dropped PID 1's records.
FORGED_DROP = (
    "from systemd import journal; journal.send('Suppressed 9 messages from init.scope', "
    "MESSAGE_ID='a596d6fe7bfa4994828e72309e95d61e', N_DROPPED='9', "
    "OBJECT_SYSTEMD_UNIT='init.scope', OBJECT_PID='1', _TRANSPORT='driver')"
)
DROPPED_WARNING = "warning: journald dropped"


def test_exits_are_reported_when_a_worker_floods_pid1_records_away(
    container: Container, tmp_path: Path
) -> None:
    c = container
    # journald's defaults on 252 are 10,000 records per 30 s (times 1-6 with the free
    # space): a smaller budget makes the flood short, the window 5 s
    c.write_file(
        "/etc/systemd/journald.conf.d/rate.conf",
        "[Journal]\nRateLimitIntervalSec=5s\nRateLimitBurst=100\n",
    )
    c.systemctl("restart", "systemd-journald")
    c.run("mkdir", "-m", "1777", "-p", "/run/ck-flood", check=True)
    c.write_file("/srv/attacker.py", NOTIFY_FLOOD)
    deploy(c, tmp_path, name="a", workers=1, exec_line=f"{PY} /srv/attacker.py")
    b = deploy(c, tmp_path, name="b", workers=2, port=3001)
    killed = {k: (b.invocation_id(k), b.main_pid(k)) for k in (0, 1)}
    # a forged record of a drop, sent by an ordinary process, is no warning
    c.run("systemd-run", "--wait", "-q", "-p", "DynamicUser=yes", PY, "-c", FORGED_DROP, check=True)
    assert DROPPED_WARNING not in ck(c, "events", "b").stderr
    since = c.run("date", "+%s.%N", check=True).stdout.strip()

    c.systemctl("kill", "-s", "USR1", "a@0.service")
    wait_for("the flood", lambda: c.run("test", "-e", "/run/ck-flood/flooding").returncode == 0)
    for k in (0, 1):
        c.systemctl("kill", "-s", "KILL", b.unit(k))
    for k in (0, 1):
        wait_for(
            f"b@{k} again",
            lambda k=k: b.is_active(b.unit(k)) and b.invocation_id(k) != killed[k][0],
        )
    c.write_file("/run/ck-flood/stop", "")
    # the attack worked: PID 1's records of both ends are gone
    for invocation, _ in killed.values():
        ends = c.journal("_PID=1", f"INVOCATION_ID={invocation}", f"MESSAGE_ID={UNIT_FAILED}")
        assert ends == [], ends

    exits = [e for e in b.events("exit") if e["invocation_id"] in {i for i, _ in killed.values()}]
    assert sorted((e["worker"], e["pid"], e["code"], e["signal"], e["lost"]) for e in exits) == [
        (k, killed[k][1], None, None, True) for k in (0, 1)
    ]
    assert all(e["exited_after_disconnect"] is False for e in exits)
    # a reader that starts between the kills and the restarts finds them too
    later = ck(c, "events", "b", "--json", f"--since=@{since}").stdout.splitlines()
    assert sorted(e["worker"] for e in map(json.loads, later) if e["event"] == "exit") == [0, 1]
    text = ck(c, "events", "b").stdout
    assert f"worker 0 (pid {killed[0][1]}) died: how is unknown" in text

    # journald's record of the drop comes with PID 1's next record after the window
    wait_for(
        "journald's record of the drop",
        lambda: c.systemctl("daemon-reload") and DROPPED_WARNING in ck(c, "events", "b").stderr,
        timeout=60,
        interval=1,
    )


def test_a_worker_that_keeps_delaying_its_stop_is_killed(container: Container, tmp_path: Path):
    """TimeoutStopSec= binds a worker only until it sends EXTEND_TIMEOUT_USEC= (sd_notify(3)),
    which it may repeat for ever: systemd then never kills it, and `systemctl stop` (so a
    reload, a stop, an uninstall) waits for ever. clusterkit's own commands kill a worker
    still stopping past its TimeoutStopSec= and 5 s, say so, and go on; the same for a worker
    that delays its start (TimeoutStartSec=)."""
    c = container
    # --drain-timeout 1: TimeoutStopSec=6s
    cl = deploy(
        c, tmp_path, "--drain-timeout", "1", name="stubborn", workers=1,
        exec_line=f"{PY} {APPS / 'extend_stop.py'}",
    )  # fmt: skip
    before = cl.main_pid(0)
    r = cl.ck("reload", "stubborn", timeout=90)
    assert "stubborn@0.service was still stopping past its TimeoutStopSec=" in r.stderr, r.stderr
    assert "killed it (SIGKILL)" in r.stderr
    after = cl.wait_active([0])[0]
    assert after != before
    cl.wait_exit(
        "the killed worker's exit event",
        lambda e: e["worker"] == 0 and e["pid"] == before and e["signal"] == "SIGKILL",
    )
    # worker 1 delays its start for ever: `scale` gives up on it after TimeoutStartSec= (3 s)
    c.write_file(
        "/run/systemd/system/stubborn@.service.d/start.conf", "[Service]\nTimeoutStartSec=3s\n"
    )
    c.systemctl("daemon-reload")
    r = cl.ck("scale", "stubborn", "2", check=False, timeout=90)
    assert "stubborn@1.service was still starting past its TimeoutStartSec=" in r.stderr, r.stderr
    assert r.returncode == 1 and "stubborn@1.service" in r.stderr.splitlines()[-1], r.stderr
    r = cl.ck("stop", "stubborn", timeout=90)
    assert "stubborn@0.service was still stopping" in r.stderr, r.stderr
    assert cl.running_ids() == []
    assert cl.state(cl.unit(0)).startswith(("inactive/", "failed/")), cl.state(cl.unit(0))


def test_stop_and_start_timeouts_are_read_as_systemd_writes_them() -> None:
    """The kill above reads TimeoutStopSec= from `systemctl show`, which prints a timespan
    for people (``1min 30s``); systemd-analyze is the oracle of what each one means."""
    from clusterkit.manager import _timespan_s

    spans = ["90s", "35.5s", "500ms", "1h 2min 3.25s", "2d", "6s", "1min 35s"]
    out = subprocess.run(
        ["systemd-analyze", "timespan", *spans], capture_output=True, text=True, check=True
    ).stdout
    blocks = [
        dict(line.strip().split(": ", 1) for line in b.splitlines()) for b in out.split("\n\n")
    ]
    assert len(blocks) == len(spans)
    for block in blocks:
        assert _timespan_s(block["Human"]) == pytest.approx(int(block["μs"]) / 1e6), block
    assert _timespan_s("infinity") is None and _timespan_s("") is None
