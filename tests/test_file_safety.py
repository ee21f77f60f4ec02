"""Root's writes and reads, attacked by another user (uid 65534) on the host.

Each test plays the attacker of DESIGN.md "Trust": a user who can write a
directory root works in, or who owns the config file root would read.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from scenario import wait_for

from clusterkit import render, shadow, unitfiles
from clusterkit.spec import build_spec

PY = sys.executable
NOBODY = 65534
EXEC = "/usr/bin/python3 -m http.server"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plays another user: needs root")


def ck(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as the clusterkit command runs it: -P keeps the current directory (*cwd*,
    the app's here and there) off sys.path, where python -m would put it first."""
    return subprocess.run(
        [PY, "-P", "-m", "clusterkit.cli", *args], capture_output=True, text=True, cwd=cwd or "/"
    )


def generate(out: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return ck("generate", "--name", "t", "--exec", EXEC, "--output", str(out), *args, cwd=cwd)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@contextlib.contextmanager
def as_other_user(work: Callable[[], None]) -> Iterator[None]:
    """Run ``work`` in a forked child as uid 65534 until the block ends.

    The block fails if the child ended before it (an attacker that died attacked nothing)."""
    pid = os.fork()
    if pid == 0:  # the attacker
        code = 0
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            work()
        except BaseException:
            code = 1
        os._exit(code)
    reaped = False
    try:
        yield
        done, status = os.waitpid(pid, os.WNOHANG)
        reaped = done == pid
        assert not reaped, f"the attacker ended early (wait status {status})"
    finally:
        if not reaped:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may write (mode 0777), reachable by uid 65534."""
    path = Path(tempfile.mkdtemp(prefix="ck-shared-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


# ---- writes ----------------------------------------------------------------------


def test_symlink_swapping_attacker_never_changes_a_victims_mode(
    shared_dir: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "shadow"
    victim.write_text("secret\n")
    victim.chmod(0o600)

    ready = shared_dir / "attacker-running"

    def swap_temp_files_for_symlinks() -> None:
        ready.touch()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for entry in os.scandir(shared_dir):
                with contextlib.suppress(OSError):
                    for name in os.listdir(entry.path):
                        if name.endswith(".tmp"):
                            path = os.path.join(entry.path, name)
                            with contextlib.suppress(OSError):
                                os.unlink(path)
                                os.symlink(victim, path)

    spec = build_spec({}, {"name": "t", "exec": EXEC})
    with as_other_user(swap_temp_files_for_symlinks):
        wait_for("the attacker to run", ready.exists, timeout=10)
        for i in range(60):
            out = shared_dir / str(i)
            out.mkdir()
            out.chmod(0o777)
            with contextlib.suppress(OSError, unitfiles.HandEditedError):
                render.write(spec, out)
    assert oct(victim.stat().st_mode & 0o7777) == oct(0o600)
    assert victim.read_text() == "secret\n"


def test_enospc_midway_leaves_the_previous_set_byte_identical(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "units"
        assert generate(out, "--workers", "2").returncode == 0
        before = snapshot(out)
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"x" * 4096)
        os.close(fd)
        os.truncate(filler, filler.stat().st_size - 4096)  # room for one staged file only
        r = generate(out, "--workers", "3", "--description", "changed")
        assert r.returncode == 1 and "No space left" in r.stderr, r.stderr
        assert snapshot(out) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_concurrent_generate_runs_leave_one_complete_set(tmp_path: Path) -> None:
    specs = [
        build_spec({}, {"name": "t", "exec": EXEC, "scheduling": mode})
        for mode in ("shared", "reuseport")
    ]
    sets = [{n: t.encode() for n, t in sorted(render.files(s).items())} for s in specs]
    for trial in range(40):
        out = tmp_path / str(trial)
        go_read, go_write = os.pipe()
        children = []
        for spec in specs:
            pid = os.fork()
            if pid == 0:  # both start writing at the same moment
                os.read(go_read, 1)
                with contextlib.suppress(Exception):
                    render.write(spec, out)
                os._exit(0)
            children.append(pid)
        os.write(go_write, b"go")
        for pid in children:
            os.waitpid(pid, 0)
        os.close(go_read)
        os.close(go_write)
        assert snapshot(out) in sets, sorted(os.listdir(out))


def test_force_never_replaces_or_deletes_a_file_without_our_header(tmp_path: Path) -> None:
    out = tmp_path / "units"
    out.mkdir()
    mine = "[Socket]\nListenStream=9\n"
    (out / "t@.socket").write_text(mine)  # a stale name for shared mode
    r = generate(out, "--force")
    assert r.returncode == 1 and "never replaced or deleted" in r.stderr, r.stderr
    assert (out / "t@.socket").read_text() == mine
    (out / "t@.socket").unlink()
    assert generate(out).returncode == 0
    (out / "t.target").write_text("[Unit]\n")  # hand-written over ours: no header now
    assert generate(out, "--force", "--workers", "3").returncode == 1
    assert (out / "t.target").read_text() == "[Unit]\n"


def test_symlinked_output_directories_are_refused(shared_dir: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    r = generate(tmp_path / "link")
    assert r.returncode == 2 and "symlink" in r.stderr and len(r.stderr.splitlines()) == 1
    assert list(real.iterdir()) == []
    # A symlink another user planted higher up the path.
    planted = shared_dir / "app"
    os.symlink(real, planted)
    os.lchown(planted, NOBODY, NOBODY)
    r = generate(planted / "units")
    assert r.returncode == 2 and "another user controls" in r.stderr, r.stderr
    assert list(real.iterdir()) == []


# ---- configuration ----------------------------------------------------------------


CONFIG = '[tool.clusterkit]\nname = "cfg"\nexec = "/usr/bin/python3 app.py"\nhardening = "none"\n'


@pytest.mark.parametrize("how", ["owned by nobody", "group-writable", "in a 0777 directory"])
def test_root_does_not_read_a_pyproject_another_user_controls(
    shared_dir: Path, tmp_path: Path, how: str
) -> None:
    app = shared_dir if how == "in a 0777 directory" else tmp_path
    config = app / "pyproject.toml"
    config.write_text(CONFIG)
    if how == "owned by nobody":
        os.chown(config, NOBODY, NOBODY)
    if how == "group-writable":
        config.chmod(0o664)
    out = tmp_path / "units"
    r = ck("generate", "--output", str(out), cwd=app)
    assert r.returncode == 2, r.stderr
    assert "./pyproject.toml: not read" in r.stderr and "--config" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    # Named explicitly, it is read, and the command says whose file it is.
    r = ck("generate", "--config", str(config), "--output", str(out), cwd=app)
    assert r.returncode == 0, r.stderr
    owner = "nobody" if how == "owned by nobody" else "root"
    assert f"using config {config} (owned by {owner})" in r.stderr


def test_the_primary_api_as_root_does_not_take_its_cluster_from_the_apps_pyproject(
    tmp_path: Path,
) -> None:
    """cluster.setup_primary() without a name reads ./pyproject.toml's, as the CLI does;
    as root, an app-owned file would choose the cluster root forks, scales or kills."""
    config = tmp_path / "pyproject.toml"
    config.write_text(CONFIG)
    os.chown(config, NOBODY, NOBODY)
    code = "from clusterkit import primary\nprimary.setup_primary()"
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERKIT_NAME"}
    r = subprocess.run(
        [PY, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, check=False
    )
    assert r.returncode != 0
    assert "PrimaryError: ./pyproject.toml: not read, " in r.stderr, r.stderr
    os.chown(config, 0, 0)  # root's own file: read
    r = subprocess.run(
        [PY, "-c", code + "\nprint(primary._current().name)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert r.stdout.strip() == "cfg", r.stderr


# ---- install -----------------------------------------------------------------------


def install(source: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return ck("install", "t", "--from", str(source), "--runtime", *args)


def test_install_refuses_a_source_another_user_can_write(shared_dir: Path) -> None:
    out = shared_dir / "units"
    assert generate(out).returncode == 0
    r = install(out)
    assert r.returncode == 2 and "writable by other users" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_planted_file_name_puts_no_escape_on_roots_terminal(tmp_path: Path) -> None:
    """Another user plants a manifest whose name holds terminal escapes (a title, a screen
    clear, a colour) in a sticky directory (as /tmp) root installs every cluster from:
    root's error names the file with each escape spelled out, on one line."""
    out = tmp_path / "units"
    out.mkdir()
    out.chmod(0o1777)
    planted = out / "\x1b]0;pwned\x07\x1b[2J\x1b[31mevil\u2028x.clusterkit.json"
    planted.write_text(unitfiles.with_header(planted.name, '{"format": 1}\n'))
    os.chown(planted, NOBODY, NOBODY)
    r = ck("install", "--from", str(out), "--runtime")
    assert r.returncode == 2, r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and "\u2028" not in r.stderr
    assert "\\x1b]0;pwned\\x07" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_forged_unit_with_a_recomputed_checksum_is_not_installed(tmp_path: Path) -> None:
    out = tmp_path / "units"
    assert generate(out).returncode == 0
    service = out / "t@.service"
    body = unitfiles._strip_header(service.read_text())
    forged = body.replace("[Service]\n", "[Service]\nExecStartPre=+/bin/sh -c 'id >/x'\n")
    service.write_text(unitfiles.with_header(service.name, forged))
    assert unitfiles.state(service) == "clusterkit"  # the checksum alone cannot tell
    r = install(out)
    assert r.returncode == 2 and "not what its spec manifest renders" in r.stderr, r.stderr


# ---- names and secrets --------------------------------------------------------------


@pytest.mark.parametrize("name", ["systemd-journald", "getty", "dbus"])
def test_names_of_existing_system_units_are_refused(tmp_path: Path, name: str) -> None:
    if not any(Path("/lib/systemd/system").glob(f"{name}[.@]*")):
        pytest.skip(f"no {name} units on this machine")
    out = tmp_path / "units"
    r = ck("generate", "--name", name, "--exec", EXEC, "--output", str(out))
    assert r.returncode == 2 and "would shadow" in r.stderr and not out.exists()
    # A manifest naming it (made by hand, checksum and all) is refused at install.
    assert generate(out).returncode == 0
    text = unitfiles._strip_header((out / "t.clusterkit.json").read_text())
    forged = out / f"{name}.clusterkit.json"
    forged.write_text(unitfiles.with_header(forged.name, text.replace('"t"', f'"{name}"')))
    r = ck("install", name, "--from", str(out), "--runtime")
    assert r.returncode == 2 and "would shadow" in r.stderr, r.stderr


#: what a setuptools editable install puts on sys.meta_path (here from sitecustomize, first):
#: a finder mapping a package name to its source tree, wherever that is
EDITABLE_FINDER = """
import importlib.abc, importlib.util, os, sys

class EditableFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "systemd":
            return None
        tree = os.path.join(%r, name)
        init = os.path.join(tree, "__init__.py")
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[tree])

sys.meta_path.insert(0, EditableFinder())  # here the venv has a systemd package too
"""


@pytest.mark.parametrize(
    "planted",
    [
        "package",
        "file",
        "templates",
        "linked-template",
        "beside",
        "pth",
        "cwd",
        "dependency",
        "dependency-bytecode",
        "editable-finder",
    ],
)
def test_root_runs_no_clusterkit_another_user_can_change(tmp_path: Path, planted: str) -> None:
    """clusterkit installed where the app's user can write (its own venv, as README step
    0 said): root's commands would run code that user can change. Root refuses to run
    from such a place, naming it; the same copy, root's alone, runs. Beside the package:
    a module on sys.path (one named as the standard library's is imported first), and the
    current directory, which `python -m` puts first on sys.path. In a dependency imported
    only once the command runs (systemd's journal bindings, for status): a module, its
    bytecode, which Python runs in place of the source, and one an editable install's
    finder (on sys.meta_path, as setuptools puts it) maps to a tree outside sys.path."""
    import py_compile
    import shutil

    import systemd

    repo = Path(__file__).resolve().parent.parent
    tmp_path.chmod(0o755)
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(repo / "clusterkit", site / "clusterkit", ignore=ignore)
    shutil.copytree(repo / "templates", site / "templates", ignore=ignore)
    shutil.copytree(Path(systemd.__file__).parent, site / "systemd", ignore=ignore)
    bytecode = Path(py_compile.compile(str(site / "systemd" / "journal.py")))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))

    def status() -> subprocess.CompletedProcess[str]:
        argv = [PY, "-B", "-m", "clusterkit.cli", "status", "nosuch"]
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)

    r = status()
    assert r.returncode != 2 and "another user can change" not in r.stderr, r.stderr
    owned = {
        "package": site / "clusterkit",
        "file": site / "clusterkit" / "serve.py",
        "templates": site / "templates" / "service.j2",
        "linked-template": tmp_path / "elsewhere.j2",
        "beside": site / "textwrap.py",
        "pth": site / "zz_app.pth",  # run at start-up from a site directory
        "cwd": cwd,
        "dependency": site / "systemd" / "journal.py",
        "dependency-bytecode": bytecode,
        "editable-finder": tmp_path / "elsewhere" / "systemd" / "__init__.py",
    }[planted]
    if planted == "editable-finder":
        shutil.move(site / "systemd", tmp_path / "elsewhere" / "systemd")
        (site / "sitecustomize.py").write_text(EDITABLE_FINDER % str(tmp_path / "elsewhere"))
    if planted == "linked-template":
        owned.write_text((site / "templates" / "service.j2").read_text())
        (site / "templates" / "service.j2").unlink()
        (site / "templates" / "service.j2").symlink_to(owned)
    elif planted in ("beside", "pth"):
        owned.write_text("import os\n")
    os.chown(owned, NOBODY, NOBODY)
    r = status()
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("clusterkit: not running as root from code another user can")
    assert f"{owned} is owned by nobody" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    if planted == "cwd":
        assert "(in the current directory, where `python -m` imports from)" in r.stderr


def test_root_runs_no_ansible_another_user_can_change(tmp_path: Path) -> None:
    """ansible-playbook runs as root in a process of its own, out of clusterkit's import
    guard: a fleet command refuses to start it while a module of ansible-core's that it
    would import is another user's (here a copy of the package, first on the path)."""
    import shutil

    import ansible

    tmp_path.chmod(0o755)
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(Path(ansible.__file__).parent, site / "ansible", ignore=ignore)
    planted = site / "ansible" / "executor" / "playbook_executor.py"
    code = "from clusterkit import fleet; print(fleet.ansible_command('ansible-playbook'))"

    def command() -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(site))
        return subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env)

    assert command().returncode == 0
    os.chown(planted, NOBODY, NOBODY)
    r = command()
    assert r.returncode != 0
    assert f"not running ansible-playbook as root: {planted} is owned by nobody" in r.stderr


def test_ansible_imports_nothing_another_user_can_change_as_root(tmp_path: Path) -> None:
    """fleet runs ansible through clusterkit.ansible_guarded: a module ansible imports as
    root (here PyYAML's, in a copy first on the path) that another user can change stops
    it before any of it runs (a review: a world-writable yaml/constructor.py ran)."""
    import shutil

    import yaml

    tmp_path.chmod(0o755)
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(Path(yaml.__file__).parent, site / "yaml", ignore=ignore)
    argv = [PY, "-m", "clusterkit.ansible_guarded", "playbook", "--version"]

    def run() -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(site))
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/")

    r = run()
    assert r.returncode == 0 and "ansible-playbook" in r.stdout, r.stderr
    planted = site / "yaml" / "constructor.py"
    os.chown(planted, NOBODY, NOBODY)
    r = run()
    assert r.returncode == 2, r.stderr
    assert f"{planted} is owned by nobody (imported as yaml.constructor)" in r.stderr


def test_a_manifest_copied_under_another_name_is_refused(tmp_path: Path) -> None:
    """u.clusterkit.json holding cluster t's spec: installing u would write t's units and
    take u's installed ones for stale."""
    out = tmp_path / "units"
    assert generate(out).returncode == 0
    text = unitfiles._strip_header((out / "t.clusterkit.json").read_text())
    copy = out / "u.clusterkit.json"
    copy.write_text(unitfiles.with_header(copy.name, text))
    r = ck("install", "u", "--from", str(out), "--runtime")
    assert r.returncode == 2, r.stderr
    assert f"{copy} is the manifest of cluster 't', not 'u'" in r.stderr


def _unit_paths(*flags: str) -> list[str]:
    r = subprocess.run(
        ["systemd-analyze", *flags, "unit-paths"], capture_output=True, text=True, check=True
    )
    return r.stdout.split()


def test_names_are_checked_in_every_directory_systemd_loads_units_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The directories are systemd's own list (the vendor's /usr/local, the generators'
    and transient units' too), for the system manager and a user's."""
    assert set(_unit_paths()) <= set(shadow.SYSTEM_UNIT_DIRS)
    monkeypatch.setenv("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
    expected = _unit_paths("--user")
    assert [str(d) for d in shadow.user_unit_dirs()] == expected


@pytest.mark.parametrize("where", ["usr/local/lib/systemd/system", "run/systemd/generator"])
def test_a_unit_in_any_load_directory_is_not_shadowed(tmp_path: Path, where: str) -> None:
    """A vendor unit under /usr/local or a generated one (a mount, say) was not seen, and
    a cluster of its name would have replaced it; in a container's tree as on the host."""
    planted = tmp_path / where / "backup.service"
    planted.parent.mkdir(parents=True)
    planted.write_text("[Service]\nExecStart=/bin/true\n")
    assert shadow.shadowed_unit("backup", root=tmp_path) == planted
    assert shadow.shadowed_unit("backups", root=tmp_path) is None


def test_a_vendor_unit_under_usr_local_is_refused_by_generate(tmp_path: Path) -> None:
    vendor = Path("/usr/local/lib/systemd/system")
    created = [d for d in (vendor.parent.parent, vendor.parent, vendor) if not d.exists()]
    vendor.mkdir(parents=True, exist_ok=True)
    planted = vendor / "cktest-vendor.service"
    planted.write_text("[Service]\nExecStart=/bin/true\n")
    try:
        out = tmp_path / "units"
        r = ck("generate", "--name", "cktest-vendor", "--exec", EXEC, "--output", str(out))
        assert r.returncode == 2 and f"would shadow the existing unit {planted}" in r.stderr
        assert not out.exists()
    finally:
        planted.unlink()
        for d in reversed(created):
            d.rmdir()


def test_env_file_is_rendered_warned_about_and_refused_at_install(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.env"
    secrets.write_text("TOKEN=s3cret\n")
    secrets.chmod(0o644)
    out = tmp_path / "units"
    r = generate(out, "--env-file", str(secrets))
    assert r.returncode == 0 and "warning: --env-file" in r.stderr and "0644" in r.stderr
    assert f"\nEnvironmentFile={secrets}\n" in (out / "t@.service").read_text()
    assert "s3cret" not in (out / "t@.service").read_text()
    r = install(out)
    assert r.returncode == 2 and "--env-file" in r.stderr and "0644" in r.stderr, r.stderr
    secrets.chmod(0o600)
    os.chown(secrets, NOBODY, NOBODY)
    r = install(out)
    assert r.returncode == 2 and "owned by nobody" in r.stderr, r.stderr
    r = generate(out, "--env-file", "relative.env")
    assert r.returncode == 2 and "--env-file" in r.stderr
