"""clusterkit install / uninstall, against a real systemd in a container."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scenario import APPS, ck, wait_for

from clusterkit import unitfiles
from clusterkit.container import Container

PY = sys.executable
CK = [PY, "-m", "clusterkit.cli"]
APP = Path(__file__).resolve().parent / "apps" / "hello_any_port.py"


def generate(tmp_path: Path, *args: str, app: Path = APP) -> Path:
    """Render units on the host; install them from the container's copy (see push)."""
    out = tmp_path / "units"
    r = subprocess.run(
        [
            *CK,
            "generate",
            "--output",
            str(out),
            "--name",
            "web",
            "--exec",
            f"{PY} {app}",
            *args,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return out


def push(container: Container, out: Path) -> str:
    """Copy rendered units into the container (the host's /tmp is not there)."""
    for f in out.iterdir():
        container.write_file(f"/srv/units/{f.name}", f.read_text(), f.stat().st_mode & 0o777)
    return "/srv/units"


def test_install_without_systemd_says_what_to_do(tmp_path: Path) -> None:
    if Path("/run/systemd/system").is_dir():
        pytest.skip("systemd is PID 1 on this machine")
    out = generate(tmp_path, "--workers", "2")
    r = subprocess.run([*CK, "install", "web", "--from", str(out)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "systemd is not running" in r.stderr and "clusterkit up" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_install_enable_start_and_uninstall(container: Container, tmp_path: Path) -> None:
    out = generate(tmp_path, "--workers", "2", "--listen", "8000")
    r = ck(container, "install", "web", "--from", push(container, out), "--now", check=False)
    assert r.returncode == 0, r.stderr
    assert "installed web" in r.stdout
    for unit in ("web.target", "web.socket"):
        assert container.systemctl("is-enabled", unit).stdout.strip() == "enabled"
    units = ("web@0.service", "web@1.service", "web.socket")
    wait_for(
        "the workers and the socket to be active",
        lambda: (
            container.systemctl("is-active", *units, check=False).stdout.split() == ["active"] * 3
        ),
    )
    assert container.http_get(8000)[0] == 200
    # Installing the same set again changes nothing, and says so (for Ansible's "changed").
    again = ck(container, "install", "web", "--from", push(container, out), "--json", check=False)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["changed"] is False and report["written"] == [] and report["unchanged"]

    r = ck(container, "uninstall", "web", check=False)
    assert r.returncode == 0, r.stderr
    assert not Path(f"/proc/{container.pid}/root/etc/systemd/system/web@.service").exists()
    state = container.systemctl("is-active", "web@0.service", "web.socket", check=False).stdout
    assert "active\n" not in state.replace("inactive", "")
    with pytest.raises(OSError):
        container.http_get(8000, timeout=2)


def test_uninstall_kills_a_worker_that_keeps_delaying_its_stop(
    container: Container, tmp_path: Path
) -> None:
    """A worker repeating EXTEND_TIMEOUT_USEC= (sd_notify(3)) is never killed by systemd;
    `systemctl disable --now` waited for it until clusterkit's call timed out (a traceback
    after 120 s). uninstall kills it past its TimeoutStopSec= (6 s here) and 5 s."""
    out = generate(tmp_path, "--workers", "1", "--drain-timeout", "1", app=APPS / "extend_stop.py")
    ck(container, "install", "web", "--from", push(container, out), "--now")
    active = ("is-active", "web@0.service")
    wait_for("web@0 active", lambda: container.systemctl(*active, check=False).returncode == 0)
    r = ck(container, "uninstall", "web", check=False, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "web@0.service was still stopping past its TimeoutStopSec=" in r.stderr, r.stderr
    state = container.systemctl("show", "-p", "LoadState,ActiveState", "web@0.service").stdout
    assert state.split() == ["LoadState=not-found", "ActiveState=inactive"], state


def test_an_earlier_versions_back_off_file_system_is_unmounted_and_removed(
    container: Container, tmp_path: Path
) -> None:
    """Earlier versions kept the workers' back-off records on a tmpfs of the cluster's own,
    a mount unit beside the others. Installing this version over one removes that unit
    file as stale, names it, and unmounts its file system (it would stay mounted until
    reboot); an uninstall removes it as well."""
    old = "run-private-clusterkit-backoff-web.mount"
    where = "/run/private/clusterkit/backoff/web"
    body = (
        "[Unit]\nDescription=Back-off records of web\n\n[Mount]\nWhat=tmpfs\n"
        f"Where={where}\nType=tmpfs\nOptions=mode=0755,size=4m\n"
    )

    def mounted() -> bool:
        return container.run("findmnt", "-n", where).returncode == 0

    for install_again in (True, False):
        out = generate(tmp_path, "--workers", "1", "--listen", "8002")
        ck(container, "install", "web", "--from", push(container, out), "--now")
        container.write_file(f"/etc/systemd/system/{old}", unitfiles.with_header(old, body))
        container.systemctl("daemon-reload")
        container.systemctl("start", old)
        assert mounted()
        if install_again:
            r = ck(container, "install", "web", "--from", push(container, out), check=False)
            assert r.returncode == 0, r.stderr
            assert f"removed {old} (no longer part of web)" in r.stdout, r.stdout
            wait_for("the old mount to go", lambda: not mounted())
            assert container.http_get(8002)[0] == 200
        ck(container, "uninstall", "web")
        assert not mounted()
        assert container.run("test", "-e", f"/etc/systemd/system/{old}").returncode != 0


@pytest.mark.parametrize(
    ("flag", "top"),
    [("--state-directory", "/var/lib"), ("--runtime-directory", "/run")],
)
def test_a_directory_root_owns_is_never_handed_to_the_workers(
    container: Container, tmp_path: Path, flag: str, top: str
) -> None:
    """systemd hands a StateDirectory= (and the like) to the workers: a chown, and with
    DynamicUser=yes a move into private/. A config naming one that already exists for
    something else (a cluster named ``dpkg`` with ``state-directory = "dpkg"``, say: its
    maintainer scripts run as root) is refused at install, and the directory is left as it
    was. One the workers got at an earlier start is theirs."""
    victim = f"{top}/web"  # another program's, that a cluster happens to share its name with
    container.write_file(f"{victim}/info/pkg.postinst", "#!/bin/sh\necho root-only\n", 0o755)
    out = generate(tmp_path, "--workers", "1", "--listen", "8005", flag, "web")
    r = ck(container, "install", "web", "--from", push(container, out), check=False)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"{flag}: {victim} exists and is owned by root" in r.stderr, r.stderr
    owner = container.run("stat", "-c", "%U %F", victim, f"{victim}/info/pkg.postinst").stdout
    assert owner.split("\n")[:2] == ["root directory", "root regular file"], owner
    assert container.run("test", "-e", "/etc/systemd/system/web@.service").returncode != 0

    container.run("rm", "-r", victim, check=True)
    ck(container, "install", "web", "--from", push(container, out), "--now")
    wait_for("web serving", lambda: container.http_get(8005)[0] == 200)
    r = ck(container, "install", "web", "--from", push(container, out), check=False)
    assert r.returncode == 0, r.stderr  # the workers' own, from the first start
    ck(container, "uninstall", "web")


def test_drop_ins_survive_reinstall_and_hand_edits_are_refused(
    container: Container, tmp_path: Path
) -> None:
    out = generate(tmp_path, "--workers", "1", "--listen", "8001")
    ck(container, "install", "web", "--from", push(container, out))
    container.write_file(
        "/etc/systemd/system/web@.service.d/override.conf", "[Service]\nEnvironment=MARK=kept\n"
    )
    out = generate(tmp_path, "--workers", "2", "--listen", "8001")  # a changed cluster
    r = ck(container, "install", "web", "--from", push(container, out), "--now", check=False)
    assert r.returncode == 0, r.stderr
    env = container.systemctl("show", "-p", "Environment", "web@1.service").stdout
    assert "MARK=kept" in env
    assert container.http_get(8001)[0] == 200

    installed = Path(f"/proc/{container.pid}/root/etc/systemd/system/web.target")
    installed.write_text(installed.read_text() + "# my note\n")
    r = ck(container, "install", "web", "--from", push(container, out), check=False)
    assert r.returncode == 1 and "edited by hand" in r.stderr
    assert installed.read_text().endswith("# my note\n")
    ck(container, "install", "web", "--from", push(container, out), "--force")

    ck(container, "uninstall", "web")
    dropin = Path(f"/proc/{container.pid}/root/etc/systemd/system/web@.service.d/override.conf")
    assert dropin.read_text() == "[Service]\nEnvironment=MARK=kept\n"


@pytest.mark.parametrize("scheduling", ["shared", "reuseport"])
def test_auto_workers_follow_the_cpus_of_the_running_host(
    container: Container, tmp_path: Path, scheduling: str
) -> None:
    out = generate(tmp_path, "--workers", "auto", "--listen", "8002", "--scheduling", scheduling)
    r = ck(container, "install", "web", "--from", push(container, out), "--now", check=False)
    assert r.returncode == 0, r.stderr
    generator = Path(f"/proc/{container.pid}/root/etc/systemd/system-generators/clusterkit-web")
    assert generator.exists()
    cpus = int(container.run("nproc").stdout)
    wants = container.systemctl("show", "-p", "Wants", "--value", "web.target").stdout.split()
    assert sorted(w for w in wants if w.startswith("web@")) == sorted(
        f"web@{i}.service" for i in range(cpus)
    )

    def active() -> int:  # install --now starts them without waiting
        listed = container.systemctl(
            "list-units", "--plain", "--no-legend", "--state=active", "web@*.service"
        ).stdout
        return len(listed.strip().splitlines())

    wait_for(f"{cpus} active workers", lambda: active() == cpus)
    ck(container, "uninstall", "web")
    assert not generator.exists()


def test_a_fixed_count_after_auto_removes_the_generator(container: Container, tmp_path: Path):
    out = generate(tmp_path, "--workers", "auto", "--listen", "8003")
    ck(container, "install", "web", "--from", push(container, out))
    generator = Path(f"/proc/{container.pid}/root/etc/systemd/system-generators/clusterkit-web")
    assert generator.exists()
    out = generate(tmp_path, "--workers", "1", "--listen", "8003")
    r = ck(container, "install", "web", "--from", push(container, out), check=False)
    assert r.returncode == 0, r.stderr
    assert not generator.exists()
    wants = container.systemctl("show", "-p", "Wants", "--value", "web.target").stdout.split()
    assert [w for w in wants if w.startswith("web@")] == ["web@0.service"]


def test_uninstall_does_not_follow_a_symlinked_wants_dir(container: Container, tmp_path: Path):
    out = generate(tmp_path, "--workers", "1", "--listen", "8004")
    ck(container, "install", "web", "--from", push(container, out))
    container.write_file("/srv/elsewhere/web@0.service", "not a link: keep me\n")
    container.run("ln", "-s", "/srv/x", "/srv/elsewhere/web@1.service", check=True)
    container.run("ln", "-s", "/srv/elsewhere", "/etc/systemd/system/web.target.wants", check=True)
    r = ck(container, "uninstall", "web", check=False)
    assert r.returncode == 0, r.stderr
    elsewhere = Path(f"/proc/{container.pid}/root/srv/elsewhere")
    assert (elsewhere / "web@0.service").read_text() == "not a link: keep me\n"
    assert (elsewhere / "web@1.service").is_symlink()


def test_env_file_secrets_reach_the_worker_and_not_the_unit(container: Container, tmp_path: Path):
    out = generate(tmp_path, "--workers", "1", "--listen", "8005", "--env-file", "/etc/web.env")
    source = push(container, out)
    container.write_file("/etc/web.env", "TOKEN=s3cret\n", 0o644)
    r = ck(container, "install", "web", "--from", source, check=False)
    assert r.returncode == 2 and "0644" in r.stderr, r.stderr
    container.write_file("/etc/web.env", "TOKEN=s3cret\n", 0o600)
    r = ck(container, "install", "web", "--from", source, "--now", check=False)
    assert r.returncode == 0, r.stderr
    wait_for("worker 0", lambda: container.http_get(8005)[0] == 200)
    pid = container.systemctl("show", "-p", "MainPID", "--value", "web@0.service").stdout.strip()
    environ = Path(f"/proc/{container.pid}/root/proc/{pid}/environ").read_bytes()
    assert b"TOKEN=s3cret\0" in environ
    shown = container.systemctl("show", "web@0.service").stdout
    unit = Path(f"/proc/{container.pid}/root/etc/systemd/system/web@.service").read_text()
    assert "s3cret" not in shown and "s3cret" not in unit
