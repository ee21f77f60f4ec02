"""clusterkit generate: the units it writes, verified by systemd's own tools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from unitcheck import exposure, verify

from clusterkit import manifest, render, unitfiles
from clusterkit.cli import main

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"


def generate(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clusterkit.cli", "generate", "--output", str(out), *args],
        capture_output=True,
        text=True,
        cwd=out.parent,
    )


HELLO = ("--name", "hello", "--exec", f"{PYTHON} -m http.server")


def test_hello_from_the_issue(tmp_path: Path) -> None:
    out = tmp_path / "units"
    r = generate(out, *HELLO, "--listen", "3000", "--workers", "4")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "hello-backoff@.service",
        "hello.clusterkit.json",
        "hello.socket",
        "hello.target",
        "hello@.service",
    ]
    target = (out / "hello.target").read_text()
    assert "Wants=hello@0.service hello@1.service hello@2.service hello@3.service" in target
    socket = (out / "hello.socket").read_text()
    assert "ListenStream=3000\n" in socket and "Service=hello@0.service" in socket
    service = (out / "hello@.service").read_text()
    assert "Sockets=hello.socket" in service and "DynamicUser=yes" in service
    assert "StartLimitIntervalSec=0" in service
    v = verify(out, "hello")
    assert (v.returncode, v.stderr, v.stdout) == (0, "", "")
    status, overall = exposure(out, "hello")
    assert status == 0, overall
    assert float(overall.split(":")[1].split()[0]) <= 2.0


def test_reuseport_writes_a_socket_template(tmp_path: Path) -> None:
    out = tmp_path / "units"
    r = generate(out, *HELLO, "--workers", "2", "--scheduling", "reuseport")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "hello-backoff@.service",
        "hello.clusterkit.json",
        "hello.target",
        "hello@.service",
        "hello@.socket",
    ]
    socket = (out / "hello@.socket").read_text()
    assert "ReusePort=yes" in socket and "Service=hello@%i.service" in socket
    assert "Sockets=hello@%i.socket" in (out / "hello@.service").read_text()
    v = verify(out, "hello")
    assert (v.returncode, v.stderr) == (0, "")


OPTION_SETS = {
    "unix-and-v6": [
        "--listen",
        "/run/app.sock",
        "--listen",
        "[::1]:8080",
        "--listen",
        "127.0.0.1:81",
    ],
    "user-group-env": [
        "--run-as",
        "www-data",
        "--group",
        "www-data",
        "--env",
        "A=1 2 $X %i",
        "--env",
        'B=quote" back\\slash',
        "--working-directory",
        "/srv/my app",
        "--env-file",
        "/etc/app/secrets.env",
    ],
    "watchdog-pinning-memory": [
        "--watchdog-sec",
        "5",
        "--cpu-affinity",
        "--memory-max",
        "512M",
        "--restart",
        "on-failure",
        "--restart-sec",
        "0.2",
        "--drain-timeout",
        "10",
        "--state-directory",
        "app/data",
        "--cache-directory",
        "app",
        "--runtime-directory",
        "app",
    ],
    "exec-type-strict": ["--type", "exec", "--hardening", "strict"],
    "simple-none": ["--type", "simple", "--hardening", "none", "--workers", "auto"],
    "auto-reuseport": ["--workers", "auto", "--scheduling", "reuseport", "--listen", "[::]:443"],
    "user-manager": ["--manager", "user"],
}


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_option_combinations_verify_cleanly(tmp_path: Path, options: list[str]) -> None:
    out = tmp_path / "units"
    r = generate(out, "--name", "app", "--exec", f"{PYTHON} -c pass", *options)
    assert r.returncode == 0, r.stderr
    v = verify(out, "app")
    assert (v.returncode, v.stderr, v.stdout) == (0, "", "")
    if "--manager" not in options and "none" not in options:
        status, overall = exposure(out, "app")
        assert status == 0, overall


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_the_manifest_renders_exactly_the_files_on_disk(tmp_path: Path, options: list[str]):
    """install re-renders from NAME.clusterkit.json: it must give back the same files."""
    out = tmp_path / "units"
    assert generate(out, "--name", "app", "--exec", f"{PYTHON} -c pass", *options).returncode == 0
    spec = manifest.loads((out / "app.clusterkit.json").read_text(), "manifest")
    assert render.files(spec) == {p.name: p.read_text() for p in out.iterdir()}


def test_auto_workers_ship_a_generator(tmp_path: Path) -> None:
    out = tmp_path / "units"
    assert generate(out, "--name", "app", "--exec", PYTHON, "--workers", "auto").returncode == 0
    generator = out / "clusterkit-app"
    assert os.access(generator, os.X_OK)
    assert "Wants=app@" not in (out / "app.target").read_text()
    # Run it the way systemd does, as if installed in /run/systemd/system-generators.
    gen_dir = tmp_path / "run" / "systemd" / "system-generators"
    gen_dir.mkdir(parents=True)
    (gen_dir / generator.name).write_bytes(generator.read_bytes())
    (gen_dir / generator.name).chmod(0o755)
    normal, early, late = (tmp_path / d for d in ("normal", "early", "late"))
    subprocess.run([str(gen_dir / generator.name), normal, early, late], check=True)
    links = sorted(p.name for p in (normal / "app.target.wants").iterdir())
    assert links == sorted(f"app@{i}.service" for i in range(len(os.sched_getaffinity(0))))
    target = os.readlink(normal / "app.target.wants" / "app@0.service")
    assert target == str(tmp_path / "run" / "systemd" / "system" / "app@.service")


BAD_INPUT = {
    "name-with-at": (["--name", "a@b"], "--name"),
    "name-with-slash": (["--name", "a/b"], "--name"),
    "name-leading-dash": (["--name", "-a"], "--name"),
    "name-newline": (["--name", "a\nb"], "--name"),
    "exec-control-char": (["--exec", "/bin/true \x07"], "--exec"),
    "exec-unbalanced-quote": (["--exec", "/bin/true 'oops"], "--exec"),
    "exec-not-found": (["--exec", "no-such-program-here"], "--exec"),
    "port-zero": (["--listen", "0"], "--listen"),
    "port-too-high": (["--listen", "65536"], "--listen"),
    "port-not-number": (["--listen", "http"], "--listen"),
    "host-name": (["--listen", "localhost:80"], "--listen"),
    "v6-without-brackets": (["--listen", "::1:80"], "--listen"),
    "relative-unix-path": (["--listen", "run/app.sock"], "--listen"),
    "unix-with-reuseport": (["--listen", "/run/a.sock", "--scheduling", "reuseport"], "--listen"),
    "workers-zero": (["--workers", "0"], "--workers"),
    "workers-absurd": (["--workers", "100000"], "--workers"),
    "workers-word": (["--workers", "many"], "--workers"),
    "scheduling-unknown": (["--scheduling", "round-robin"], "--scheduling"),
    "env-no-equals": (["--env", "NOVALUE"], "--env"),
    "env-bad-key": (["--env", "1X=2"], "--env"),
    "env-newline": (["--env", "X=a\nb"], "--env"),
    "restart-unknown": (["--restart", "sometimes"], "--restart"),
    "type-unknown": (["--type", "forking"], "--type"),
    "hardening-unknown": (["--hardening", "max"], "--hardening"),
    "memory-garbage": (["--memory-max", "lots"], "--memory-max"),
    "watchdog-negative": (["--watchdog-sec", "-1"], "--watchdog-sec"),
    "relative-workdir": (["--working-directory", "srv"], "--working-directory"),
    "group-without-user": (["--group", "www-data"], "--group"),
}


@pytest.mark.parametrize("args,field", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, args: list[str], field: str) -> None:
    out = tmp_path / "units"
    base = {"--name": "app", "--exec": f"{PYTHON} -m http.server"}
    for flag in args[::2]:
        base.pop(flag, None)
    flat = [x for kv in base.items() for x in kv]
    r = generate(out, *flat, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert field in r.stderr
    assert not out.exists()


CONFIG_ERRORS = {
    "unknown-key": ('[tool.clusterkit]\nname = "a"\nexec = "/bin/true"\nport = 80\n', "'port'"),
    "not-toml": ("[tool.clusterkit\n", "not valid TOML"),
    "wrong-type": ('[tool.clusterkit]\nname = 7\nexec = "/bin/true"\n', "--name"),
    "bad-workers": (
        '[tool.clusterkit]\nname = "a"\nexec = "/bin/true"\nworkers = -1\n',
        "--workers",
    ),
}


@pytest.mark.parametrize("text,needle", CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_bad_config_exits_2_and_writes_nothing(tmp_path: Path, text: str, needle: str) -> None:
    config = tmp_path / "pyproject.toml"
    config.write_text(text)
    out = tmp_path / "units"
    r = generate(out, "--config", str(config))
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_unreadable_config(tmp_path: Path) -> None:
    config = tmp_path / "pyproject.toml"
    config.write_bytes(b"\xff\xfe not utf-8")
    r = generate(tmp_path / "units", "--config", str(config))
    assert r.returncode == 2 and "--config" in r.stderr


def test_config_file_and_flags_override(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.clusterkit]\nname = "cfg"\nexec = ["/usr/bin/python3", "app.py"]\n'
        'workers = 3\nlisten = [8000, "127.0.0.1:8001"]\nenv = { MODE = "prod" }\n'
    )
    out = tmp_path / "units"
    r = generate(out, "--workers", "2")  # pyproject.toml of the current directory
    assert r.returncode == 0, r.stderr
    assert "Wants=cfg@0.service cfg@1.service\n" in (out / "cfg.target").read_text()
    socket = (out / "cfg.socket").read_text()
    assert "ListenStream=8000\n" in socket and "ListenStream=127.0.0.1:8001\n" in socket
    assert 'Environment="MODE=prod"' in (out / "cfg@.service").read_text()


def test_hand_edited_unit_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "units"
    args = ["--name", "app", "--exec", PYTHON]
    assert generate(out, *args).returncode == 0
    service = out / "app@.service"
    assert unitfiles.state(service) == "clusterkit"
    edited = service.read_text().replace("KillMode=mixed", "KillMode=control-group")
    service.write_text(edited)
    assert unitfiles.state(service) == "edited"
    r = generate(out, *args, "--workers", "3")
    assert r.returncode == 1 and "edited by hand" in r.stderr and "--force" in r.stderr
    assert service.read_text() == edited
    assert "app@2" not in (out / "app.target").read_text()  # nothing else written either
    r = generate(out, *args, "--workers", "3", "--force")
    assert r.returncode == 0
    assert "KillMode=mixed" in service.read_text() and unitfiles.state(service) == "clusterkit"


def test_regenerating_is_idempotent_and_removes_stale_units(tmp_path: Path) -> None:
    out = tmp_path / "units"
    args = ["--name", "app", "--exec", PYTHON]
    generate(out, *args)
    r = generate(out, *args)
    assert r.stdout.count("unchanged") == 6 and "wrote" not in r.stdout
    r = generate(out, *args, "--scheduling", "reuseport")
    assert "removed" in r.stdout and not (out / "app.socket").exists()
    assert (out / "app@.socket").exists()


def test_a_foreign_file_with_our_name_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "units"
    out.mkdir()
    (out / "app.target").write_text("[Unit]\nDescription=mine\n")
    r = generate(out, "--name", "app", "--exec", PYTHON)
    assert r.returncode == 1
    assert (out / "app.target").read_text() == "[Unit]\nDescription=mine\n"
    assert not (out / "app@.service").exists()


def test_units_dir_is_in_sync_with_the_generator(tmp_path: Path) -> None:
    """units/ holds the example's units, exactly as the generator renders them now."""
    out = tmp_path / "units"
    config = ROOT / "examples" / "hello" / "pyproject.toml"
    assert main(["generate", "--config", str(config), "--output", str(out)]) == 0
    committed = {p.name: p.read_text() for p in (ROOT / "units").iterdir()}
    fresh = {p.name: p.read_text() for p in out.iterdir()}
    assert fresh == committed, (
        "units/ is stale: run `clusterkit generate --config "
        "examples/hello/pyproject.toml --output units`"
    )


def test_readme_option_table_is_the_option_table() -> None:
    """The README's table of generate's options is spec.options_table(), exactly."""
    from clusterkit.spec import options_table

    readme = (ROOT / "README.md").read_text()
    assert options_table() in readme, "regenerate the README table from spec.options_table()"


def test_deprecated_spellings_still_work_and_say_so(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.clusterkit]\nname = "old"\nexec = "/usr/bin/true"\nstop-timeout = 7\n'
    )
    r = generate(
        tmp_path / "units", "--config", str(tmp_path / "pyproject.toml"), "--user", "www-data"
    )
    assert r.returncode == 0, r.stderr
    assert "--user is deprecated" in r.stderr and "stop-timeout is deprecated" in r.stderr
    service = (tmp_path / "units" / "old@.service").read_text()
    assert "User=www-data\n" in service and "TimeoutStopSec=12s\n" in service
