"""``clusterkit fleet`` on a real network of systemd hosts (issue 12).

One topology for the whole module (tests/fleet_topology.py): a LAN namespace with
a bridge, HAProxy and the load generator; three hosts (systemd 252 containers,
each in its own namespace, sshd for Ansible, the journal uploader) and a collector
(systemd-journal-remote, its directory bound to one here). Every address is in
198.18.0.0/24. The tests run in file order and share it; the last one kills a host.
Measured figures go to ``bench/FLEET.md`` at the end.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fleet_topology import LAN_ADDRESS, SUBNET, Lan, SshKeys, boot_host
from scenario import APPS, HOSTILE, PY, ROOT, Load, shown_safely, wait_for

from clusterkit import report
from clusterkit.container import Container, prerequisites_missing, stop_process

NAME = "web"
LB_PORT = 8080
CLI = [PY, "-I", "-m", "clusterkit.cli"]
COLLECTOR = f"{SUBNET}.2"
STRANGER = f"{SUBNET}.99"
FIGURES = ROOT / "bench" / "FLEET.md"
REMOTE_FS = "64M"  # the collector's file system
REMOTE_MAX_USE = "8M"  # fleet.collector_max_use


def _missing() -> str | None:
    reason = prerequisites_missing()
    if reason:
        return reason
    for tool in ("haproxy", "ip", "ssh", "ssh-keygen", "sshd", "curl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} not found (bash dev test installs it)"
    for path in ("/lib/systemd/systemd-journal-remote", "/lib/systemd/systemd-journal-upload"):
        if not Path(path).exists():
            return f"{path} not found (apt-get install systemd-journal-remote)"
    if not (Path(PY).parent / "ansible-playbook").exists():
        return "ansible-playbook not in the venv (pip install -e '.[fleet]')"
    return None


@dataclass
class Topology:
    tmp: Path
    lan: Lan
    hosts: dict[str, Container]  # inventory name -> container
    addresses: dict[str, str]
    collector: Container
    config: Path
    haproxy: subprocess.Popen | None = None
    figures: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``clusterkit ARGS`` in the LAN namespace (the control machine)."""
        return subprocess.run(
            self.lan.argv(*CLI, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.tmp,
        )

    def fleet(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = self.cli("fleet", args[0], "--config", str(self.config), *args[1:], timeout=timeout)
        assert r.returncode == 0, f"fleet {args[0]} failed:\n{r.stdout[-4000:]}\n{r.stderr}"
        return r

    def servers(self) -> dict[str, dict[str, str]]:
        from clusterkit.fleet import HAProxy

        return HAProxy(self.tmp / "haproxy.sock", NAME).servers()

    def all_up(self) -> bool:
        from clusterkit.fleet import FleetFailure

        try:
            servers = self.servers()
        except FleetFailure:  # HAProxy is starting
            return False
        return len(servers) == 3 and all(r["status"] == "UP" for r in servers.values())

    def load(self, **kw: object) -> Load:
        assert self.haproxy is not None
        options: dict[str, object] = {
            "host": LAN_ADDRESS,
            "concurrency": 4,
            "pause": 0.005,
            "timeout": 10,
            "max_seconds": 90,
        }
        options.update(kw)
        return Load(self.haproxy.pid, LB_PORT, **options)  # type: ignore[arg-type]


def _boot_all(specs: list[tuple[str, str, str, tuple[str, ...], tuple[str, ...]]], keys: SshKeys):
    """Boot the containers in parallel threads; any failure powers off the ones that booted."""
    booted: dict[str, Container] = {}
    errors: list[BaseException] = []

    def one(name: str, ns: str, address: str, unmask: tuple[str, ...], binds: tuple[str, ...]):
        try:
            booted[name] = boot_host(name, ns, address, keys, unmask=unmask, binds=binds)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=spec) for spec in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for c in booted.values():
            c.poweroff()
        raise errors[0]
    return booted


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to run the fleet test: {reason}")
        pytest.skip(reason)
    tmp = Path(tempfile.mkdtemp(prefix="ckfleet-test-"))
    tmp.chmod(0o755)
    lan = Lan().create()
    booted: dict[str, Container] = {}
    topology: Topology | None = None
    started = time.monotonic()
    try:
        keys = SshKeys(tmp / "ssh").create()
        remote = tmp / "remote"
        remote.mkdir()
        # journal-remote sizes its files from their file system (1/80 of it): on this one a
        # file is full at 0.8 MiB, so a test can make it start new ones (and vacuum them)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={REMOTE_FS}", "ck", remote], check=True
        )
        specs = []
        addresses = {}
        for i in (1, 2, 3):
            ns, address = lan.add_host(i)
            name = f"{lan.prefix}-h{i}"
            addresses[name] = address
            specs.append((name, ns, address, ("systemd-journal-upload.service",), ()))
        ns, _ = lan.add_host(0, COLLECTOR)
        collector_name = f"{lan.prefix}-col"
        specs.append(
            (
                collector_name,
                ns,
                COLLECTOR,
                ("systemd-journal-remote.socket", "systemd-journal-remote.service"),
                (f"{remote}:/var/log/journal/remote",),
            )
        )
        keys.pin([*addresses.values(), COLLECTOR])
        booted = _boot_all(specs, keys)
        hosts_table = ", ".join(f'"{n}" = "{a}"' for n, a in addresses.items())
        config = tmp / "pyproject.toml"
        config.write_text(
            f"""[tool.clusterkit]
name = "{NAME}"
exec = "{PY} {APPS / "whoami.py"}"
workers = 2
listen = [3000]

[tool.clusterkit.fleet]
hosts = {{ {hosts_table} }}
ssh_key = "{keys.client_key}"
known_hosts = "{keys.known_hosts}"
clusterkit = "{Path(PY).parent / "clusterkit"}"
runtime = true
collector = "{COLLECTOR}"
collector_ssh = true
collector_directory = "{remote}"
collector_max_use = "{REMOTE_MAX_USE}"
haproxy_socket = "{tmp / "haproxy.sock"}"
server_timeout = 2  # a silent host's requests are given up (and retried) quickly
"""
        )
        topology = Topology(
            tmp,
            lan,
            {n: booted[n] for n in addresses},
            addresses,
            booted[collector_name],
            config,
        )
        topology.figures["boot (4 containers, in parallel)"] = f"{time.monotonic() - started:.1f} s"
        yield topology
    finally:
        if topology is not None and topology.haproxy is not None:
            stop_process(topology.haproxy)  # ours: by pid and its own process group
        for c in booted.values():
            c.poweroff()
        lan.close()
        if topology is not None and topology.figures:
            _write_figures(topology.figures)
        subprocess.run(["umount", "-l", tmp / "remote"], check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _write_figures(figures: dict[str, str]) -> None:
    lines = [
        "# clusterkit fleet: measured figures",
        "",
        "Written by `tests/test_fleet.py` from its last run (3 hosts of 2 workers, systemd 252",
        "containers on one 2-core machine, HAProxy 2.6 in front, bounded load of 4 concurrent",
        'clients with a new connection per request; see the README\'s "Several hosts").',
        "",
        "| what | measured |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in figures.items()),
        "",
    ]
    FIGURES.write_text("\n".join(lines))


# ---- input --------------------------------------------------------------------------


def test_bad_inventory_exits_2(tmp_path: Path) -> None:
    base = '[tool.clusterkit]\nname = "web"\nexec = "/bin/true"\n'
    cases = {
        "fleet.hosts.a": base + '[tool.clusterkit.fleet]\nhosts = { a = "not-an-address" }\n',
        "fleet.colector": base + '[tool.clusterkit.fleet]\nhosts = { a = "198.18.0.11" }\n'
        'colector = "198.18.0.2"\n',
        "fleet.port": base + '[tool.clusterkit.fleet]\nhosts = { a = "198.18.0.11" }\nport = 0\n',
        "fleet.hosts": base + "[tool.clusterkit.fleet]\nhosts = {}\n",
        # rendered into the collector's vacuum unit: a size, never another argument
        "fleet.collector_max_use": base + '[tool.clusterkit.fleet]\nhosts = { a = "198.18.0.11" }\n'
        'collector_max_use = "4G --vacuum-time=1s"\n',
        # rendered into HAProxy's configuration: one word, never a second keyword
        "fleet.haproxy_socket": base + '[tool.clusterkit.fleet]\nhosts = { a = "198.18.0.11" }\n'
        'haproxy_socket = "/run/a.sock mode 666"\n',
        "fleet.health_path": base + '[tool.clusterkit.fleet]\nhosts = { a = "198.18.0.11" }\n'
        'health_path = "/health#x"\n',
        "fleet.health_host": base + '[tool.clusterkit.fleet]\nhosts = { a = "198.18.0.11" }\n'
        'health_host = "app.example hdr X-Admin yes"\n',
        "fleet.server_timeout": base + '[tool.clusterkit.fleet]\nhosts = { a = "198.18.0.11" }\n'
        'server_timeout = "2s\\n    timeout client 1d"\n',
    }
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[clusterkit]\nweb1 ansible_host=web1.example\n")
    cases["inventory: host web1"] = base + f'[tool.clusterkit.fleet]\ninventory = "{inventory}"\n'
    for field_name, text in cases.items():
        config = tmp_path / "pyproject.toml"
        config.write_text(text)
        r = subprocess.run(
            [*CLI, "fleet", "status", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert r.returncode == 2, (field_name, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert field_name in r.stderr, (field_name, r.stderr)
        assert r.stdout == ""


NOBODY = 65534  # the app's user, in these tests


def test_root_runs_no_fleet_input_another_user_can_change(tmp_path: Path) -> None:
    """The attacker is the app's user, who owns the app's directory. Root's fleet commands
    read the fleet's pyproject.toml, and Ansible then runs what it names: an inventory
    that is a script, plugins named by an ./ansible.cfg, vars beside the inventory. Each
    case plants one and runs a read-only `fleet haproxy-config` as root: refused with one
    line (or, for the current directory, ignored), and the planted code never runs."""
    if not (Path(PY).parent / "ansible-inventory").exists():
        assert not os.environ.get("CI"), "ansible-inventory is missing (the fleet extra)"
        pytest.skip("ansible-inventory is missing: pip install -e '.[fleet]'")
    pwned = tmp_path / "pwned"
    app = tmp_path / "app"
    (app / "plugins").mkdir(parents=True)
    mine = tmp_path / "root-only"
    mine.mkdir(mode=0o700)
    base = '[tool.clusterkit]\nname = "web"\nexec = "/bin/true"\nlisten = [3000]\n'
    script = f'#!/bin/sh\nid -u > {pwned}\necho \'{{"clusterkit": {{"hosts": ["h"]}}}}\'\n'
    (app / "inv.sh").write_text(script)
    (app / "inv.sh").chmod(0o755)
    (app / "pyproject.toml").write_text(base + '[tool.clusterkit.fleet]\ninventory = "inv.sh"\n')
    (app / "ansible.cfg").write_text(
        "[defaults]\ninventory_plugins = ./plugins\n[inventory]\nenable_plugins = evil, ini\n"
    )
    (app / "plugins" / "evil.py").write_text(f"import os\nos.system('id -u > {pwned}')\n")
    (app / "key").write_text("not a key\n")
    (mine / "inv.ini").write_text("[clusterkit]\nweb1 ansible_host=198.18.0.11\n")
    for path in [app, *app.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)

    def fleet(config: Path | None, text: str | None = None) -> subprocess.CompletedProcess[str]:
        if text is not None:
            assert config is not None
            config.write_text(base + "[tool.clusterkit.fleet]\n" + text)
        flags = ["--config", str(config)] if config is not None else []
        argv = [*CLI, "fleet", "haproxy-config", *flags, "--bind", "*:80"]
        return subprocess.run(argv, capture_output=True, text=True, cwd=app)

    refused = {
        # the app's ./pyproject.toml, not named: not read at all
        "./pyproject.toml": fleet(None),
        # named by root after a look, but the inventory it names is the app's script
        "inventory": fleet(app / "pyproject.toml"),
        # root's config, the app's ssh key
        "fleet.ssh_key": fleet(
            mine / "pyproject.toml", f'inventory = "inv.ini"\nssh_key = "{app / "key"}"\n'
        ),
    }
    (mine / "group_vars").mkdir()
    (mine / "group_vars" / "all.yml").write_text("ansible_ssh_common_args: -oProxyCommand=x\n")
    os.chown(mine / "group_vars" / "all.yml", NOBODY, NOBODY)
    refused["inventory: not using"] = fleet(mine / "pyproject.toml", 'inventory = "inv.ini"\n')
    for field_name, r in refused.items():
        assert r.returncode == 2, (field_name, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert field_name in lines[-1] and "owned by nobody" in lines[-1], (field_name, lines)
        assert r.stdout == ""
    shutil.rmtree(mine / "group_vars")
    # root's own config and inventory, run from the app's directory: its ansible.cfg and
    # plugins are not Ansible's to load
    r = fleet(mine / "pyproject.toml", 'inventory = "inv.ini"\n')
    assert r.returncode == 0, r.stderr
    assert "198.18.0.11" in r.stdout
    assert not pwned.exists(), pwned.read_text()


def test_haproxy_waits_server_timeout_for_a_host(tmp_path: Path) -> None:
    """HAProxy gives a host fleet.server_timeout to answer: 30 s unless set (it was a fixed
    2 s, so every request slower than that got 504, after running on up to four hosts)."""
    from clusterkit.fleet import haproxy_config
    from clusterkit.fleetspec import load_fleet

    config = tmp_path / "pyproject.toml"
    base = '[tool.clusterkit]\nname = "web"\nexec = "/bin/true"\nlisten = ["8000"]\n'
    base += '[tool.clusterkit.fleet]\nhosts = { a = "198.18.0.11" }\n'
    for line, expected in (("", "30s"), ("server_timeout = 120\n", "120s")):
        config.write_text(base + line)
        text = haproxy_config(load_fleet(config), "127.0.0.1:8080", None)
        assert f"\n    timeout server {expected}\n" in text


def test_bad_haproxy_bind_exits_2_before_anything_is_written(tmp_path: Path) -> None:
    config = tmp_path / "pyproject.toml"
    config.write_text(
        '[tool.clusterkit]\nname = "web"\nexec = "/bin/true"\nlisten = ["8000"]\n'
        '[tool.clusterkit.fleet]\nhosts = { a = "198.18.0.11" }\n'
    )
    out = tmp_path / "haproxy.cfg"
    bad = [
        "*:80\n    stats socket /tmp/admin.sock level admin",  # a second line of configuration
        "*:80 ssl crt /tmp/x.pem",  # a second word
        "300.1.1.1:80",
        "[not-v6]:80",
        "*:0",
        "*:８０",  # not ASCII digits
        "80",
    ]
    for bind in bad:
        for argv in (
            ["haproxy-config", "--bind", bind, "-o", str(out)],
            ["install", "--haproxy-bind", bind, "--haproxy-config", str(out)],
        ):
            r = subprocess.run(
                [*CLI, "fleet", *argv, "--config", str(config)],
                capture_output=True,
                text=True,
                cwd=tmp_path,
            )
            assert r.returncode == 2, (argv, r.stdout, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert "bind: " in r.stderr and "ADDRESS:PORT" in r.stderr, r.stderr
            assert not out.exists()
    for bind in ("*:80", ":80", "198.18.0.1:80", "[::]:80", "[2001:db8::1]:8080", "lb1:80"):
        r = subprocess.run(
            [*CLI, "fleet", "haproxy-config", "--bind", bind, "--config", str(config)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, (bind, r.stderr)
        assert f"\n    bind {bind}\n" in r.stdout


def test_haproxy_config_is_written_whole_and_never_over_the_operators_own(tmp_path: Path) -> None:
    """HAProxy's configuration is often the operator's /etc/haproxy/haproxy.cfg: clusterkit
    writes it atomically, with its header, and replaces only a file it wrote itself."""
    config = tmp_path / "pyproject.toml"
    config.write_text(
        '[tool.clusterkit]\nname = "web"\nexec = "/bin/true"\nlisten = ["8000"]\n'
        '[tool.clusterkit.fleet]\nhosts = { a = "198.18.0.11" }\n'
    )
    etc = tmp_path / "etc-haproxy"
    etc.mkdir()
    cfg = etc / "haproxy.cfg"

    def write(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*CLI, "fleet", "haproxy-config", "-o", str(cfg), "--config", str(config), *extra],
            capture_output=True,
            text=True,
        )

    own = "global\n    log /dev/log local0\n# the operator's own frontends\n"
    cfg.write_text(own)
    for extra in ((), ("--force",)):
        r = write(*extra)
        assert r.returncode == 1 and "not written by clusterkit" in r.stderr, r
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert cfg.read_text() == own
    cfg.unlink()

    r = write()
    assert r.returncode == 0 and r.stdout == f"wrote {cfg}\n", r
    first = cfg.read_text()
    assert first.startswith("# Generated by clusterkit ") and "clusterkit-sha256: " in first
    assert "timeout http-request 10s" in first
    assert write().stdout == f"unchanged {cfg}\n"
    if shutil.which("haproxy") is not None:  # HAProxy reads it, header and all
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr

    cfg.write_text(first + "    maxconn 100\n")  # edited by hand
    r = write()
    assert r.returncode == 1 and "edited by hand" in r.stderr and "--force" in r.stderr, r
    assert cfg.read_text().endswith("maxconn 100\n")
    r = write("--force")
    assert r.returncode == 0 and cfg.read_text() == first
    assert sorted(p.name for p in etc.iterdir()) == ["haproxy.cfg"]  # no temporary file left

    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    r = subprocess.run(
        [*CLI, "fleet", "haproxy-config", "-o", str(link / "haproxy.cfg"), "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "symlink" in r.stderr, r
    assert not any((tmp_path / "elsewhere").iterdir())


def test_lb_refuses_what_would_be_a_second_runtime_api_command(tmp_path: Path) -> None:
    """`fleet lb` writes SERVER and --backend into a line of HAProxy's runtime API, where
    `;` or a newline starts another command (e.g. one disabling every other server)."""
    sock = str(tmp_path / "admin.sock")  # never reached: refused before
    cases = [
        (["drain", "web1; disable server web/web2", "--backend", "web"], "SERVER"),
        (["ready", "web1\nshutdown sessions server web/web2", "--backend", "web"], "SERVER"),
        (["show", "web1", "--backend", "web;disable frontend web_front"], "--backend"),
        (["drain", "web1", "--backend", "web", "--timeout", "nan"], "--timeout"),
        (["drain", "web1", "--backend", "web", "--timeout", "-1"], "--timeout"),
    ]
    for argv, flag in cases:
        r = subprocess.run(
            [*CLI, "fleet", "lb", *argv, "--socket", sock], capture_output=True, text=True
        )
        assert r.returncode == 2, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and f"{flag}: " in r.stderr, r.stderr


def test_fleet_table_and_haproxy_config(tmp_path: Path) -> None:
    from clusterkit.fleet import collector_files, haproxy_config
    from clusterkit.fleetspec import load_fleet

    config = tmp_path / "pyproject.toml"
    config.write_text(
        '[tool.clusterkit]\nname = "web"\nexec = "/bin/true"\nlisten = ["8000"]\n'
        '[tool.clusterkit.fleet]\nhosts = { a = "198.18.0.11", b = "198.18.0.12" }\n'
        'collector = "198.18.0.2"\nhealth_path = "/healthz"\n'
    )
    fleet = load_fleet(config)
    assert [(h.name, h.address) for h in fleet.hosts] == [
        ("a", "198.18.0.11"),
        ("b", "198.18.0.12"),
    ]
    assert fleet.port == 8000 and fleet.backend == "web" and fleet.package == "clusterkit-systemd"
    text = haproxy_config(fleet, "*:80", "/run/haproxy/admin.sock")
    assert "option httpchk GET /healthz" in text
    assert "server a 198.18.0.11:8000 check inter 1s fall 2 rise 2 observe layer4" in text
    assert "stats socket /run/haproxy/admin.sock mode 600 level admin" in text
    remote = tmp_path / "remote"
    remote.mkdir()
    for name in ("remote-198.18.0.11.journal", "remote-198.18.0.11@x-1-2.journal~", "other"):
        (remote / name).write_text("")
    assert list(collector_files(remote)) == ["198.18.0.11"]
    assert len(collector_files(remote)["198.18.0.11"]) == 2

    # the same hosts from an Ansible inventory (parsed by ansible-inventory)
    if (Path(PY).parent / "ansible-inventory").exists():
        inventory = tmp_path / "hosts.ini"
        inventory.write_text("[clusterkit]\na ansible_host=198.18.0.11\n198.18.0.12\n")
        config.write_text(
            '[tool.clusterkit]\nname = "web"\nexec = "/bin/true"\n'
            f'[tool.clusterkit.fleet]\ninventory = "{inventory}"\n'
        )
        fleet = load_fleet(config)
        assert [(h.name, h.address) for h in fleet.hosts] == [
            ("a", "198.18.0.11"),
            ("198.18.0.12", "198.18.0.12"),
        ]


@contextlib.contextmanager
def _loopback_haproxy(
    tmp_path: Path,
    backend_port: int,
    addresses: tuple[str, ...] = ("127.0.0.1",),
    fleet_keys: str = "",
) -> Iterator[tuple[object, int]]:
    """Real HAProxy on the loopback with ``fleet haproxy-config``'s configuration, one
    server per address ("a", "b", ...) at *backend_port*, *fleet_keys* (TOML lines) added to
    the fleet table: (the fleet, the frontend's port). Stopped after."""
    from clusterkit.fleet import haproxy_config
    from clusterkit.fleetspec import load_fleet

    if shutil.which("haproxy") is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed (bash dev test installs it)")
        pytest.skip("haproxy is not installed (bash dev test installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        front = probe.getsockname()[1]
    admin = tmp_path / "admin.sock"
    hosts = ", ".join(f'{chr(ord("a") + i)} = "{a}"' for i, a in enumerate(addresses))
    config = tmp_path / "pyproject.toml"
    config.write_text(
        f'[tool.clusterkit]\nname = "web"\nexec = "/bin/true"\nlisten = ["{backend_port}"]\n'
        f"[tool.clusterkit.fleet]\nhosts = {{ {hosts} }}\n"
        f'collector = "127.0.0.1"\nhaproxy_socket = "{admin}"\n{fleet_keys}'
    )
    fleet = load_fleet(config)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(fleet, f"127.0.0.1:{front}", str(admin)))
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    admin.unlink(missing_ok=True)  # an earlier HAProxy's: wait for this one's
    proxy = subprocess.Popen(
        ["haproxy", "-db", "-f", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for("HAProxy's runtime API", admin.exists, timeout=10)
        yield fleet, front
    finally:
        os.killpg(proxy.pid, signal.SIGKILL)
        proxy.wait()


def test_status_shows_haproxy_check_without_its_in_progress_marker(tmp_path: Path) -> None:
    """While a health check runs, HAProxy's ``show stat`` says ``* L7TOUT`` (the last
    result, marked): ``fleet status`` reports the result and ``checking`` apart. Real
    HAProxy on the loopback; its one server accepts and never answers."""
    from clusterkit.fleet import haproxy_view

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        with _loopback_haproxy(tmp_path, silent.getsockname()[1]) as (fleet, _):

            def in_progress() -> dict[str, object] | None:
                row = (haproxy_view(fleet) or {}).get("a")
                return row if row and row["checking"] else None

            row = wait_for("a health check in progress", in_progress, timeout=10, interval=0.02)
            assert row["check"] and not str(row["check"]).startswith("*"), row


class _BackendHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        wanted = self.server.only_host  # type: ignore[attr-defined]
        if wanted and self.headers.get("Host") != wanted:  # as Django's ALLOWED_HOSTS
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path != "/":
            self.server.arrived[self.command, self.path] += 1  # type: ignore[attr-defined]
        if self.path in ("/500", "/503"):  # the app's own error, or a worker shedding load
            self.send_response(int(self.path[1:]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/echo":  # the header fields as the app receives them
            body = "".join(f"{k.lower()}: {v}\n" for k, v in self.headers.items()).encode()
        elif self.path == "/vanish":  # read whole, then gone unanswered: a host dying mid-request
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Length", str(3 + len(body)))
        self.end_headers()
        self.wfile.write(b"ok\n" + body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_LOCK = _any  # noqa: N815
    do_CONNECT = _any  # noqa: N815 - answered 200, as waitress did

    def log_message(self, *args: object) -> None:
        pass


class _Backend(http.server.ThreadingHTTPServer):
    """A plain HTTP/1.1 server in a thread, for real HAProxy to balance: 200 to ``/``;
    ``/500`` and ``/503`` answer that status; ``/vanish`` is read and dropped unanswered;
    ``/echo`` answers the request's header fields, one ``name: value`` line each.
    ``arrived`` counts the requests other than ``/`` by (method, path)."""

    def __init__(self, address: tuple[str, int], only_host: str = "") -> None:
        self.arrived: collections.Counter[tuple[str, str]] = collections.Counter()
        self.only_host = only_host  # else 400, as an app that checks the Host header
        super().__init__(address, _BackendHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # HAProxy's health checks close without reading the whole answer

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def _wait_all_up(fleet) -> None:
    from clusterkit.fleet import haproxy_view

    wait_for(
        "HAProxy to see every server UP",
        lambda: all(
            row.get("status") == "UP" for row in (haproxy_view(fleet) or {"-": {}}).values()
        ),
        timeout=20,
    )


def test_haproxy_never_replays_a_request_whose_method_is_not_idempotent(tmp_path: Path) -> None:
    """HAProxy's l7 retries replay a request that got no answer on another host; it does
    not know which methods are idempotent (RFC 9110, 9.2.2), so the configuration must
    say. Two hosts that read a request and vanish without answering: a GET is replayed on
    the other one; a POST, a PATCH and a method HAProxy has no name for are sent once."""
    first = _Backend(("127.0.0.1", 0))
    port = first.server_address[1]
    second = _Backend(("127.0.0.2", port))
    try:
        with _loopback_haproxy(tmp_path, port, ("127.0.0.1", "127.0.0.2")) as (fleet, front):
            for method in ("GET", "POST", "PATCH", "LOCK"):
                _wait_all_up(fleet)  # a vanished request marks its host down for a while
                with socket.create_connection(("127.0.0.1", front), timeout=10) as c:
                    c.sendall(
                        f"{method} /vanish HTTP/1.1\r\nHost: lb\r\nContent-Length: 2\r\n"
                        "Connection: close\r\n\r\nhi".encode()
                    )
                    reply = c.makefile("rb").read()
                assert not reply.startswith(b"HTTP/1.1 2"), reply[:100]
            sent = first.arrived + second.arrived
            assert sent["GET", "/vanish"] >= 2, sent  # replayed: the retries are on
            once = [sent[m, "/vanish"] for m in ("POST", "PATCH", "LOCK")]
            assert once == [1, 1, 1], sent
    finally:
        first.close()
        second.close()


def test_haproxy_opens_no_tunnel_to_a_host(tmp_path: Path) -> None:
    """A host that answers CONNECT with a 2xx (waitress did) made HAProxy tunnel the
    client's later bytes to it untouched: a request with its own X-Forwarded-For, past
    the header rules and timeouts. HAProxy refuses CONNECT itself now: it never reaches
    a host, and what follows on the connection is an ordinary request, rules and all."""
    backend = _Backend(("127.0.0.1", 0))
    try:
        with _loopback_haproxy(tmp_path, backend.server_address[1]) as (fleet, front):
            _wait_all_up(fleet)
            with socket.create_connection(("127.0.0.1", front), timeout=10) as c:
                c.sendall(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n")
                time.sleep(0.3)
                c.sendall(
                    b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.6.6.6\r\n"
                    b"Connection: close\r\n\r\n"
                )
                reply = c.makefile("rb").read()
            assert reply.startswith(b"HTTP/1.1 405"), reply[:200]
            assert backend.arrived["CONNECT", "x:443"] == 0, backend.arrived
            assert b"x-forwarded-for: 127.0.0.1\n" in reply, reply
            assert b"10.6.6.6" not in reply
    finally:
        backend.close()


def test_a_client_making_the_app_answer_500_takes_no_host_down(tmp_path: Path) -> None:
    """Any client that can make the app answer 500 (a bug, a bad input) could, if HAProxy
    counted the app's 500s as a host's failures, mark every host down in turn: with
    `observe layer7 error-limit 1` two such requests left both hosts DOWN and everyone got
    503. Each 500 must reach the client as it is, run once, and leave every host UP; a 503
    (a worker shedding load) is still tried on the other host."""
    from clusterkit.fleet import haproxy_view

    first = _Backend(("127.0.0.1", 0))
    port = first.server_address[1]
    second = _Backend(("127.0.0.2", port))
    try:
        with _loopback_haproxy(tmp_path, port, ("127.0.0.1", "127.0.0.2")) as (fleet, front):
            _wait_all_up(fleet)
            for path, status in (("/500", 500),) * 4 + (("/503", 503),):
                with socket.create_connection(("127.0.0.1", front), timeout=10) as c:
                    c.sendall(
                        f"GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n".encode()
                    )
                    reply = c.makefile("rb").read()
                assert reply.startswith(b"HTTP/1.1 %d" % status), reply[:100]
            rows = haproxy_view(fleet) or {}
            assert {name: row["status"] for name, row in rows.items()} == {"a": "UP", "b": "UP"}
            sent = first.arrived + second.arrived
            assert sent["GET", "/500"] == 4, sent
            assert sent["GET", "/503"] >= 2, sent
            with socket.create_connection(("127.0.0.1", front), timeout=10) as c:
                c.sendall(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
                assert c.makefile("rb").read().startswith(b"HTTP/1.1 200")
    finally:
        first.close()
        second.close()


def test_the_app_gets_the_clients_address_and_no_client_can_forge_it(tmp_path: Path) -> None:
    """Behind HAProxy the app sees HAProxy's address; it learns the client's from
    X-Forwarded-For, and whether it came over TLS from X-Forwarded-Proto. A client that
    sends those fields itself (or Forwarded, X-Real-IP, X-Forwarded-Host and the like) must
    not be believed: an app that trusts them from the proxy would take a forged address (an
    allow-list, a rate limit, a log), host or path prefix, or think a plain request came
    over TLS."""
    backend = _Backend(("127.0.0.1", 0))
    try:
        with _loopback_haproxy(tmp_path, backend.server_address[1]) as (fleet, front):
            _wait_all_up(fleet)
            with socket.create_connection(("127.0.0.1", front), timeout=10) as c:
                c.sendall(
                    b"GET /echo HTTP/1.1\r\nHost: lb\r\nX-Forwarded-For: 10.6.6.6\r\n"
                    b"x-forwarded-for: 10.7.7.7\r\nForwarded: for=10.6.6.6;proto=https\r\n"
                    b"X-Real-IP: 10.6.6.6\r\nX-Forwarded-Proto: https\r\n"
                    b"X-Forwarded-Host: admin.example\r\nX-Forwarded-Port: 443\r\n"
                    b"X-Forwarded-Prefix: /admin\r\nX-Forwarded-Server: lb\r\n"
                    b"X-Client-IP: 10.6.6.6\r\nTrue-Client-IP: 10.6.6.6\r\n"
                    b"X-Cluster-Client-IP: 10.6.6.6\r\n"
                    b"Connection: close\r\n\r\n"
                )
                reply = c.makefile("rb").read().decode("latin-1")
        head, _, fields = reply.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200"), reply
        seen = [line.partition(": ") for line in fields.splitlines()]
        forwarding = sorted(
            (name, value)
            for name, _, value in seen
            if name.startswith(("x-forw", "forw", "x-real", "x-client", "true-client", "x-cluster"))
        )
        assert forwarding == [("x-forwarded-for", "127.0.0.1"), ("x-forwarded-proto", "http")]
    finally:
        backend.close()


SLOW_CLIENTS = 40
HAPROXY_REQUEST_TIMEOUT = 10.0  # templates/haproxy.cfg.j2, timeout http-request


def test_health_check_sends_the_host_the_app_accepts(tmp_path: Path) -> None:
    """HAProxy's plain `option httpchk GET /` is HTTP/1.0 with no Host: an app that checks
    the Host header (Django's ALLOWED_HOSTS) answers 400 and every host stays DOWN.
    fleet.health_host makes the check HTTP/1.1 with that Host."""
    from clusterkit.fleet import haproxy_view

    backend = _Backend(("127.0.0.1", 0), only_host="app.example")
    try:
        port = backend.server_address[1]
        with _loopback_haproxy(tmp_path, port) as (fleet, _):
            row = wait_for(
                "a failed health check",
                lambda: (
                    ((haproxy_view(fleet) or {}).get("a") or {}).get("check") == "L7STS"
                    and (haproxy_view(fleet) or {})["a"]
                ),
                timeout=15,
            )
            assert str(row["status"]).startswith("DOWN"), row
        keys = 'health_host = "app.example"\n'
        with _loopback_haproxy(tmp_path, port, fleet_keys=keys) as (fleet, front):
            _wait_all_up(fleet)
            with socket.create_connection(("127.0.0.1", front), timeout=10) as c:
                c.sendall(b"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n")
                assert c.makefile("rb").read().startswith(b"HTTP/1.1 200")
    finally:
        backend.close()


def test_haproxy_runs_as_its_own_user_in_a_chroot(tmp_path: Path) -> None:
    """HAProxy parses every byte from the network; started by root (as Debian's unit does),
    it must not go on as root."""
    import pwd

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        with _loopback_haproxy(tmp_path, silent.getsockname()[1]) as (_, front):
            pids = subprocess.run(
                ["pgrep", "-f", f"haproxy -db -f {tmp_path / 'haproxy.cfg'}"],
                capture_output=True, text=True, check=True,
            ).stdout.split()  # fmt: skip
            assert pids
            for pid in pids:
                status = Path(f"/proc/{pid}/status").read_text()
                uids = next(
                    line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")
                )
                assert set(uids) == {str(pwd.getpwnam("haproxy").pw_uid)}, uids
                assert os.readlink(f"/proc/{pid}/root") == "/var/lib/haproxy"
            with socket.create_connection(("127.0.0.1", front), timeout=5):
                pass  # and it still accepts


def test_haproxy_closes_slowloris_connections_that_the_workers_never_see(tmp_path: Path) -> None:
    """HAProxy reads a request's whole head before it forwards a byte, so behind it the
    workers' header_timeout never sees a slow client: HAProxy's own must close it. Half the
    slow clients send a header line every second (which restarts `timeout client` every
    time), half a whole head and then a body byte a second (a slow POST); each must get 408
    and lose its connection within `timeout http-request`, no slow body may reach the host
    (it would hold a connection of a worker), and an ordinary request is still answered."""

    backend = _Backend(("127.0.0.1", 0))
    slow: list[tuple[socket.socket, float]] = []
    try:
        with _loopback_haproxy(tmp_path, backend.server_address[1]) as (fleet, front):
            _wait_all_up(fleet)
            for i in range(SLOW_CLIENTS):
                s = socket.create_connection(("127.0.0.1", front), timeout=5)
                if i % 2:
                    s.sendall(
                        b"POST /slow-body HTTP/1.1\r\nHost: lb\r\nContent-Length: 100\r\n\r\n"
                    )
                else:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: lb\r\n")
                slow.append((s, time.monotonic()))
            answers: dict[int, bytes] = {}
            deadline = slow[-1][1] + HAPROXY_REQUEST_TIMEOUT + 5
            n = 0
            while len(answers) < len(slow) and time.monotonic() < deadline:
                n += 1
                for i, (s, began) in enumerate(slow):
                    if i in answers:
                        continue
                    try:
                        s.sendall(b"x" if i % 2 else b"X-Slow-%d: 1\r\n" % n)
                    except OSError:
                        pass  # closed: what it got is read below
                    s.setblocking(False)
                    try:
                        got = s.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        got = b""
                    answers[i] = got
                    assert time.monotonic() - began <= HAPROXY_REQUEST_TIMEOUT + 2, i
                if n == 3:  # the slow clients hold their connections: others are served
                    with socket.create_connection(("127.0.0.1", front), timeout=5) as c:
                        c.sendall(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
                        reply = c.makefile("rb").read()
                    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
                time.sleep(1)
            still_open = len(slow) - len(answers)
            assert still_open == 0, f"{still_open} slow clients still connected"
            assert all(a.startswith(b"HTTP/1.1 408") for a in answers.values()), answers
            assert not backend.arrived, backend.arrived
    finally:
        for s, _ in slow:
            s.close()
        backend.close()


# ---- the topology -------------------------------------------------------------------------


def test_install_renders_haproxy_and_status_shows_every_host(topo: Topology) -> None:
    started = time.monotonic()
    cfg = topo.tmp / "haproxy.cfg"
    r = topo.fleet(
        "install", "--haproxy-config", str(cfg), "--haproxy-bind", f"{LAN_ADDRESS}:{LB_PORT}"
    )
    topo.figures["fleet install (collector + 3 hosts, first run)"] = (
        f"{time.monotonic() - started:.1f} s"
    )
    assert "failed=0" in r.stdout and "unreachable=0" in r.stdout, r.stdout[-3000:]
    text = cfg.read_text()
    for setting in (
        "option httpchk GET /",
        "option redispatch 1",
        "retry-on conn-failure empty-response junk-response response-timeout 0rtt-rejected 502",
        "http-request disable-l7-retry unless METH_GET || METH_HEAD || METH_OPTIONS || METH_PUT"
        " || METH_DELETE || METH_TRACE",
        "timeout connect 500ms",
        "observe layer4 error-limit 1 on-error mark-down",
    ):
        assert setting in text
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = open(topo.tmp / "haproxy.log", "w")  # noqa: SIM115 - closed with the process
    topo.haproxy = subprocess.Popen(
        topo.lan.argv("haproxy", "-db", "-f", str(cfg)),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for("HAProxy to see every host UP", lambda: topo.all_up(), timeout=20)

    # a rerun with nothing to do changes nothing
    started = time.monotonic()
    r = topo.fleet("install")
    topo.figures["fleet install (rerun, nothing to do)"] = f"{time.monotonic() - started:.1f} s"
    recap = [line for line in r.stdout.splitlines() if "ok=" in line and "changed=" in line]
    assert recap and all("changed=0" in line for line in recap), r.stdout[-3000:]

    started = time.monotonic()
    r = topo.fleet("status", "--json")
    topo.figures["fleet status --json"] = f"{time.monotonic() - started:.1f} s"
    rows = {row["host"]: row for row in json.loads(r.stdout)}
    assert set(rows) == set(topo.hosts)
    for name, row in rows.items():
        assert row["address"] == topo.addresses[name]
        assert row["reachable"] is True
        assert sorted(w["id"] for w in row["workers"]) == [0, 1], row
        assert all(w["state"] == "listening" for w in row["workers"]), row
        assert row["haproxy"]["status"] == "UP" and row["haproxy"]["check"] == "L7OK", row

    with topo.load(max_requests=300) as load:
        load.wait_requests(300, timeout=30)
        report = load.stop()
    assert not report.failed(), report.summary()


@dataclass
class Follower:
    """``clusterkit fleet events --follow --json`` in the background, lines timestamped."""

    proc: subprocess.Popen
    lines: list[tuple[float, dict]] = field(default_factory=list)

    @classmethod
    def start(cls, topo: Topology) -> Follower:
        proc = subprocess.Popen(
            [*CLI, "fleet", "events", "--follow", "--json", "--config", str(topo.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=topo.tmp,
            start_new_session=True,
        )
        f = cls(proc)
        threading.Thread(target=f._read, daemon=True).start()
        return f

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), json.loads(line)))

    def exits(self, after: float, signal_name: str | None = "SIGKILL") -> dict[str, tuple]:
        """host -> (arrival, event) of the first exit event read after ``after``."""
        found: dict[str, tuple] = {}
        for arrived, ev in list(self.lines):
            if arrived >= after and ev["event"] == "exit" and ev["signal"] == signal_name:
                found.setdefault(ev["host"], (arrived, ev))
        return found

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err or ""


def _kill_worker(c: Container, k: int) -> None:
    c.run("systemctl", "kill", "--signal=SIGKILL", f"{NAME}@{k}.service", check=True)


def test_sigkilled_workers_show_in_fleet_events_with_their_host(topo: Topology) -> None:
    follower = Follower.start(topo)
    try:
        time.sleep(1.0)  # it has read the history
        mark = time.monotonic()
        killed = {}
        for name, c in topo.hosts.items():
            _kill_worker(c, 0)
            killed[name] = time.monotonic()
        found = wait_for(
            "an exit event of every host",
            lambda: e if len(e := follower.exits(mark)) == 3 else None,
            timeout=10,
        )
        delays = []
        for name, (arrived, ev) in found.items():
            assert ev["worker"] == 0 and ev["signal"] == "SIGKILL" and ev["code"] is None, ev
            assert ev["address"] == topo.addresses[name]
            delays.append(arrived - killed[name])
        assert max(delays) < 2.0, delays
        topo.figures["SIGKILL to `fleet events` line (3 hosts)"] = (
            f"{min(delays):.2f}-{max(delays):.2f} s (limit 2 s)"
        )

        # Records uploaded by h2 as if from PID 1: one claims to be h1 (worker 1 died), the
        # other claims to be h2 itself (worker 7), which shows the forgery gets through the
        # collector and the event parser, so only the host check can drop the first.
        h1, h2 = list(topo.hosts)[:2]
        fake = _fake_exit_record(h1, worker=1)
        for record in (fake, _fake_exit_record(h2, worker=7)):
            _upload(topo.hosts[h2], record)
        # The same from an address that is no host of the inventory.
        topo.lan.add_address(STRANGER)
        stranger = subprocess.run(
            topo.lan.argv(
                "curl", "-sS", "--max-time", "3", "--interface", STRANGER,
                "-H", "Content-Type: application/vnd.fdo.journal", "--data-binary", "@-",
                f"http://{COLLECTOR}:19532/upload",
            ),
            input=fake, capture_output=True, text=True,
        )  # fmt: skip
        topo.figures["upload from a non-host address"] = (
            "refused by the collector's socket (IPAddressDeny)"
            if stranger.returncode != 0
            else "accepted by journal-remote (no BPF firewall under this machine's cgroup v1), "
            "ignored by `fleet events` with a warning"
        )
        time.sleep(1.5)
        r = topo.fleet("events", "--json")
        events = [json.loads(line) for line in r.stdout.splitlines()]
        assert not [e for e in events if e["worker"] == 1 and e["event"] == "exit"], events
        own = [e for e in events if e["worker"] == 7 and e["event"] == "exit"]
        assert [e["host"] for e in own] == [h2], events
        assert all(e["host"] in topo.hosts for e in events)
        if stranger.returncode == 0:
            assert STRANGER in r.stderr

        # the building block: one host's events from journal files (no host check of its own)
        one = sorted((topo.tmp / "remote").glob(f"remote-{topo.addresses[h1]}*.journal"))
        assert one, list((topo.tmp / "remote").iterdir())
        single = topo.tmp / "single"
        single.mkdir(exist_ok=True)
        for f in one:
            (single / f.name).symlink_to(f)
        r = topo.cli("events", NAME, "--directory", str(single), "--json")
        assert r.returncode == 0, r.stderr
        kills = [json.loads(x) for x in r.stdout.splitlines()]
        assert [e for e in kills if e["event"] == "exit" and e["signal"] == "SIGKILL"], kills

        r = topo.fleet("logs", "--json")
        lines = [json.loads(line) for line in r.stdout.splitlines()]
        serving = {ln["host"] for ln in lines if "serving on" in str(ln["message"])}
        assert serving == set(topo.hosts), lines[-10:]

        # A worker's message is the app's text: `fleet logs` shows it escaped, each line
        # of it under its record's, as `clusterkit logs` does.
        _upload(topo.hosts[h2], _worker_log_record(h2, worker=0, message=HOSTILE))
        text = wait_for(
            "the hostile record in fleet logs",
            lambda: t if "pwned" in (t := topo.fleet("logs").stdout) else None,
        )
        assert shown_safely(text), text
        for line in text.splitlines():  # a record's first line, or one of its continuations
            assert line[:1].isdigit() or line.startswith("    "), line
        assert f" {h2} {NAME}@0.service: pwned\\x1b]52;c;" in text, text
        rows = [json.loads(x) for x in topo.fleet("logs", "--json").stdout.splitlines()]
        hostile = [row for row in rows if row["message"] == HOSTILE]
        assert [(row["host"], row["worker"], row["pid"]) for row in hostile] == [(h2, 0, 4242)]

        # The fields PID 1 fills can say anything too. A signal, a result or an exit code
        # that is not shaped like one is none (worker 8), an exit code of 5,000 digits
        # too (worker 9: int() of it raised), and an invocation id that is not 128 bits
        # in hex drops the record (worker 10).
        forged = "KILL\x1b]52;c;cm0gLXJmIC8K\x07\nworker 0 died"
        for worker, code, status, invocation in (
            (8, "killed", forged, "e" * 32),
            (9, "exited", "9" * 5000, "d" * 32),
            (10, "killed", "KILL", "c" * 31 + "\x1b"),
        ):
            exit_fields = dict(COMMAND="ExecStart", EXIT_CODE=code, EXIT_STATUS=status)
            for message_id, more in ((report.PROCESS_EXIT, exit_fields), (report.UNIT_FAILED, {})):
                result = forged if worker == 8 else "exit-code"
                record = _pid1_record(
                    h2, worker, message_id, UNIT_RESULT=result, INVOCATION_ID=invocation, **more
                )
                _upload(topo.hosts[h2], record)

        def forged_exits() -> dict[int, dict] | None:
            events = [json.loads(x) for x in topo.fleet("events", "--json").stdout.splitlines()]
            exits = {e["worker"]: e for e in events if e["event"] == "exit"}
            return exits if {8, 9} <= exits.keys() else None

        exits = wait_for("the forged exits of workers 8 and 9", forged_exits)
        assert exits[8]["signal"] is None and exits[8]["service_result"] is None, exits[8]
        assert exits[9]["code"] is None and exits[9]["service_result"] == "exit-code", exits[9]
        assert 10 not in exits, exits[10]
        text = topo.fleet("events").stdout
        assert all(ch.isprintable() or ch == "\n" for ch in text), text
    finally:
        follower.stop()


def _upload(host: Container, record: str) -> None:
    """Upload *record* to the collector from *host*, as its journal-upload would."""
    r = host.run(
        "curl", "-sS", "--max-time", "5",
        "-H", "Content-Type: application/vnd.fdo.journal",
        "--data-binary", "@-", f"http://{COLLECTOR}:19532/upload", input=record,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def _export(**fields: str) -> str:
    """One record in the journal export format. A value that is not printable ASCII goes
    in the binary form (a little-endian 64-bit length, then the bytes), which lets it hold
    a line feed; kept under 128 bytes, each byte of that length is ASCII, so the record
    stays a str."""
    now = str(int(time.time() * 1_000_000))
    record = f"__REALTIME_TIMESTAMP={now}\n__MONOTONIC_TIMESTAMP={now}\n_BOOT_ID={'0' * 32}\n"
    for name, value in fields.items():
        if value.isascii() and value.isprintable():
            record += f"{name}={value}\n"
        else:
            size = len(value.encode())
            assert size < 128, name
            record += f"{name}\n{struct.pack('<Q', size).decode()}{value}\n"
    return record + "\n"


def _pid1_record(hostname: str, worker: int, message_id: str, **fields: str) -> str:
    """A record as PID 1 writes it about NAME@worker, claiming to come from *hostname*."""
    unit = f"{NAME}@{worker}.service"
    return _export(
        MESSAGE=f"{unit}: {fields.pop('MESSAGE', 'forged')}",
        MESSAGE_ID=message_id,
        UNIT=unit,
        _PID="1",
        _UID="0",
        _HOSTNAME=hostname,
        **fields,
    )


def _fake_exit_record(hostname: str, worker: int) -> str:
    """PID 1's "Failed with result 'signal'" about NAME@worker."""
    return _pid1_record(
        hostname,
        worker,
        report.UNIT_FAILED,
        MESSAGE="Failed with result 'signal'.",
        UNIT_RESULT="signal",
        INVOCATION_ID="f" * 32,
    )


def _worker_log_record(hostname: str, worker: int, message: str) -> str:
    """A log line of NAME@worker."""
    return _export(
        PRIORITY="6",
        _PID="4242",
        _UID="1001",
        _SYSTEMD_UNIT=f"{NAME}@{worker}.service",
        _HOSTNAME=hostname,
        MESSAGE=message,
    )


def test_collector_outage_loses_no_event(topo: Topology) -> None:
    follower = Follower.start(topo)
    try:
        time.sleep(1.0)
        topo.collector.systemctl(
            "stop", "systemd-journal-remote.socket", "systemd-journal-remote.service"
        )
        mark = time.monotonic()
        for c in topo.hosts.values():
            _kill_worker(c, 1)
        time.sleep(10)
        assert not follower.exits(mark), "events arrived while the collector was down"
        topo.collector.systemctl("start", "systemd-journal-remote.socket")
        back = time.monotonic()
        found = wait_for(
            "every host's event after the outage",
            lambda: e if len(e := follower.exits(mark)) == 3 else None,
            timeout=20,
        )
        for _, ev in found.values():
            assert ev["worker"] == 1 and ev["signal"] == "SIGKILL", ev
        late = max(arrived for arrived, _ in found.values()) - back
        topo.figures["collector down 10 s: events lost / delivered after restart"] = (
            f"0 of 3 / {late:.2f} s after it came back"
        )
    finally:
        follower.stop()
    pid = topo.collector.systemctl("show", "-p", "MainPID", "--value", "systemd-journal-remote")
    main = pid.stdout.strip()
    if main and main != "0":
        status = topo.collector.run("cat", f"/proc/{main}/status").stdout
        rss = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS")), "?")
        stat = topo.collector.run("cat", f"/proc/{main}/stat").stdout
        ticks = sum(int(x) for x in stat[stat.rindex(")") + 2 :].split()[11:13])
        topo.figures["collector (journal-remote) after the tests above"] = (
            f"RSS {int(rss) / 1024:.1f} MiB, CPU {ticks / os.sysconf('SC_CLK_TCK'):.2f} s "
            "since its restart"
        )
    host = next(iter(topo.hosts.values()))
    pid = host.systemctl("show", "-p", "MainPID", "--value", "systemd-journal-upload").stdout
    if pid.strip() not in ("", "0"):
        status = host.run("cat", f"/proc/{pid.strip()}/status").stdout
        rss = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS")), "0")
        topo.figures["uploader (journal-upload) on one host"] = f"RSS {int(rss) / 1024:.1f} MiB"


def test_collector_keeps_the_uploaded_journals_under_max_use(topo: Topology) -> None:
    """A host uploading as fast as it can fills no disk: each time journal-remote starts a
    new file, the vacuum deletes the oldest archived ones past ``collector_max_use``."""
    vacuum = ("clusterkit-remote-vacuum.service", "clusterkit-remote-vacuum.path")
    # the stock units, with the roles' drop-ins: their man pages are not in the containers
    stock = ("systemd-journal-remote.service", "systemd-journal-remote.socket")
    upload = ("systemd-journal-upload.service",)
    for c, man, units in (
        (topo.collector, "yes", vacuum),
        (topo.collector, "no", stock),
        (next(iter(topo.hosts.values())), "no", upload),
    ):
        verify = c.run("systemd-analyze", "verify", f"--man={man}", *units)
        assert verify.returncode == 0 and not verify.stderr, verify.stderr
    remote = topo.tmp / "remote"
    bound = 8 * 1024 * 1024
    assert REMOTE_MAX_USE == "8M"
    file_size = 820 * 1024  # what journal-remote fills a file to on REMOTE_FS, and a little
    host = next(iter(topo.hosts.values()))
    blob = base64.b64encode(os.urandom(48 * 1024)).decode()  # 64 KiB that barely compresses
    for _ in range(8):  # 8 uploads of 4 MiB, of which journal-remote keeps 3 after compression
        _upload(host, "".join(_export(MESSAGE=f"{i} {blob}") for i in range(64)))

    def on_disk() -> int:
        total = 0
        for f in remote.glob("*.journal"):
            try:
                total += f.stat().st_blocks * 512
            except FileNotFoundError:  # vacuumed since the listing
                pass
        return total

    used = wait_for(
        f"the collector's files back under {REMOTE_MAX_USE} and one file more",
        lambda: u if (u := on_disk()) <= bound + file_size else None,
        timeout=30,
    )
    runs = topo.collector.journal("-u", "clusterkit-remote-vacuum.service")
    freed = [str(e["MESSAGE"]) for e in runs if str(e.get("MESSAGE", "")).startswith("Deleted")]
    assert len(freed) >= 8, freed  # about 24 MiB kept by journal-remote, 8 by the vacuum
    active = topo.collector.systemctl("is-active", "clusterkit-remote-vacuum.path", check=False)
    assert active.stdout.strip() == "active", active.stdout  # no trigger limit hit
    topo.figures[f"collector files after 32 MiB uploaded, collector_max_use {REMOTE_MAX_USE}"] = (
        f"{used / 2**20:.1f} MiB ({len(freed)} archived files deleted)"
    )


def test_fleet_reload_under_load_fails_no_request(topo: Topology) -> None:
    with topo.load() as load:
        load.wait_requests(100)
        started = time.monotonic()
        topo.fleet("reload")
        took = time.monotonic() - started
        load.wait_requests(100, sent_after=time.monotonic())
        report = load.stop()
    assert not report.failed(), report.summary()
    topo.figures["fleet reload under load (3 hosts, serial)"] = (
        f"{len(report.failed())} failed of {len(report.samples)} requests, {took:.1f} s"
    )


def test_fleet_restart_hosts_drains_and_fails_no_request(topo: Topology) -> None:
    out_of_rotation: list[int] = []  # how many servers were not UP, sampled every 50 ms
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            out_of_rotation.append(sum(s["status"] != "UP" for s in topo.servers().values()))

    watcher = threading.Thread(target=watch, daemon=True)
    with topo.load() as load:
        load.wait_requests(100)
        watcher.start()
        started = time.monotonic()
        try:
            r = topo.fleet("restart-hosts", timeout=180)
        finally:
            done.set()
            watcher.join()
        took = time.monotonic() - started
        load.wait_requests(100, sent_after=time.monotonic())
        report = load.stop()
    assert not report.failed(), report.summary()
    assert max(out_of_rotation) == 1, "never more than one host out of rotation, and one was"
    assert r.stdout.count("Drain in HAProxy") == 3, r.stdout[-3000:]
    assert all(s["status"] == "UP" for s in topo.servers().values())
    topo.figures["fleet restart-hosts under load (drain, restart units, ready)"] = (
        f"{len(report.failed())} failed of {len(report.samples)} requests, {took:.1f} s"
    )


def test_restart_hosts_stops_at_a_failure_and_says_the_host_is_drained(topo: Topology) -> None:
    first = list(topo.hosts)[0]
    r = topo.cli(
        "fleet", "restart-hosts", "--command", "exit 3", "--config", str(topo.config), timeout=120
    )  # fmt: skip
    assert r.returncode == 1, r.stdout[-3000:]
    assert f"{first} FAILED after being drained and is STILL DRAINED" in r.stdout, r.stdout
    servers = topo.servers()
    assert servers[first]["status"] == "DRAIN", servers
    assert all(servers[n]["status"] == "UP" for n in topo.hosts if n != first), servers
    r = topo.cli(
        "fleet", "lb", "ready", first, "--socket", str(topo.tmp / "haproxy.sock"), "--backend", NAME
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert topo.all_up()


def test_fleet_status_shows_a_host_whose_worker_does_not_serve(topo: Topology) -> None:
    """A worker that does not serve (stopped here; a crash loop or a start that never
    ends alike) makes its host's `clusterkit status` exit 3. The host answered: its rows
    are shown and it is reachable, and fleet status exits 3 as status does (the host was
    called UNREACHABLE and its rows hidden, so one worker hid its healthy siblings)."""
    first = next(iter(topo.hosts))
    host = topo.hosts[first]
    host.systemctl("stop", f"{NAME}@1.service")
    try:
        r = topo.cli("fleet", "status", "--json", "--config", str(topo.config))
        assert r.returncode == 3, r.stdout[-3000:] + r.stderr
        rows = {row["host"]: row for row in json.loads(r.stdout)}
        assert rows[first]["reachable"] is True, rows[first]
        states = {w["id"]: w["state"] for w in rows[first]["workers"]}
        assert states[0] == "listening" and states[1] != "listening", states
        assert rows[first]["workers"][1]["why"], rows[first]
        for name in topo.hosts:
            if name != first:
                assert all(w["state"] == "listening" for w in rows[name]["workers"]), rows
        r = topo.cli("fleet", "status", "--config", str(topo.config))
        assert r.returncode == 3, r.stderr
        line = next(x for x in r.stdout.splitlines() if x.startswith(first))
        assert "1/2 workers listening" in line, r.stdout
    finally:
        host.systemctl("start", f"{NAME}@1.service")
    r = topo.fleet("status", "--json")  # all serve again: 0
    assert all(w["why"] is None for row in json.loads(r.stdout) for w in row["workers"])


def _time_to_down(topo: Topology, name: str, since: float, timeout: float = 10) -> float:
    wait_for(
        f"HAProxy to mark {name} down",
        lambda: topo.servers()[name]["status"].startswith("DOWN"),
        timeout=timeout,
        interval=0.02,
    )
    return time.monotonic() - since


def _host_failure(topo: Topology, name: str, label: str, act) -> None:
    with topo.load() as load:
        load.wait_requests(200)
        at = load.mark("failure")
        act()
        down = _time_to_down(topo, name, at)
        load.wait_requests(200, sent_after=time.monotonic())
        report = load.stop()
    failed = report.failed()
    # at most the requests in flight when it happened: one per client
    assert len(failed) <= 4, report.summary()
    assert not report.failed(sent_after=at + down + 0.1), report.summary()
    assert down < 1.0, f"{name} marked down after {down:.2f} s"
    topo.figures[label] = (
        f"{len(failed)} failed of {len(report.samples)} requests; "
        f"HAProxy marked it down after {down:.2f} s"
    )


def test_silent_host_costs_only_in_flight_requests(topo: Topology) -> None:
    index = 2
    name = list(topo.hosts)[index - 1]
    try:
        _host_failure(topo, name, "host link cut (silent host)", lambda: topo.lan.cut(index))
    finally:
        topo.lan.mend(index)
    wait_for(f"{name} UP again", lambda: topo.servers()[name]["status"] == "UP", timeout=20)


def test_killed_host_costs_only_in_flight_requests(topo: Topology) -> None:
    name = list(topo.hosts)[2]
    c = topo.hosts[name]
    _host_failure(
        topo, name, "host killed (SIGKILL of its PID 1)", lambda: os.kill(c.pid, signal.SIGKILL)
    )
    c.poweroff()
    r = topo.cli("fleet", "status", "--json", "--config", str(topo.config))
    rows = {row["host"]: row for row in json.loads(r.stdout)}
    assert r.returncode == 1
    assert rows[name]["reachable"] is False and rows[name]["haproxy"]["status"].startswith("DOWN")
    assert all(rows[n]["reachable"] for n in rows if n != name)
