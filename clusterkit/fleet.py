"""One cluster on several hosts: Ansible reaches them, HAProxy balances, journal-remote collects.

clusterkit itself never opens an ssh session or loops over hosts: it runs
``ansible-playbook`` with the playbooks and roles shipped in
``clusterkit/ansible/`` (``clusterkit fleet roles-path`` prints where), and on
each host those call the same ``clusterkit`` CLI a single host uses
(``generate``, ``install``, ``status --json``, ``reload``). What this module does
on the control machine:

- render the inventory from ``[tool.clusterkit.fleet]`` (or use the user's own)
  and the variables the playbooks take; run a playbook; close its ssh masters;
- talk to HAProxy's runtime API (a unix socket): servers' state, drain, ready;
- read the collector's directory: one journal reader per sending host, and only
  files whose sender address belongs to the inventory (:class:`FleetEvents`).
"""

from __future__ import annotations

import base64
import csv
import importlib.util
import io
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from clusterkit import trust
from clusterkit.fleetspec import COLLECTOR_GROUP, GROUP, Fleet, FleetError, Host

PLAYBOOK_DIR = Path(__file__).resolve().parent / "ansible"
PLAYBOOKS = ("install", "status", "reload", "restart-hosts")


class FleetFailure(Exception):
    """A fleet operation failed (exit 1); the message says what to do."""


# ---- Ansible ------------------------------------------------------------------------


def ansible_command(tool: str) -> list[str]:
    """How to run ``ansible-playbook`` or ``ansible-inventory`` (*tool*) from this Python's
    environment (the ``fleet`` extra): through :mod:`clusterkit.ansible_guarded`, which
    guards every module ansible imports as root. As root, ansible-core's package tree must
    be root's alone too: ansible reads the modules it ships to hosts as data."""
    package = importlib.util.find_spec("ansible")
    if package is None:
        raise FleetFailure(
            f"{tool} not found: install the fleet extra (pip install 'clusterkit-systemd[fleet]')"
        )
    if trust.as_root():
        for top in package.submodule_search_locations or ():
            reason = trust.why_tree_untrusted(Path(top))
            if reason is not None:
                raise FleetFailure(
                    f"not running {tool} as root: {reason}; install ansible-core where only "
                    "root can write (clusterkit's own venv, its fleet extra)"
                )
    return [sys.executable, "-I", "-m", "clusterkit.ansible_guarded", tool.removeprefix("ansible-")]


def empty_ansible_config(directory: Path) -> Path:
    """An ansible.cfg with no settings, in *directory*: Ansible reads ./ansible.cfg when
    ANSIBLE_CONFIG is not set, and the current directory may be the app's."""
    config = directory / "ansible.cfg"
    config.write_text("# clusterkit fleet: settings come from the environment\n")
    return config


def controller_command() -> list[str]:
    """How a playbook runs this clusterkit on the control machine (HAProxy's runtime API)."""
    return [sys.executable, "-I", "-m", "clusterkit.cli"]


class Runner:
    """Runs the shipped playbooks against a fleet, from a private working directory.

    The directory holds the rendered inventory, the variables, Ansible's local
    temporary files and its ssh control sockets (a short path: unix socket names
    are limited); :meth:`close` ends the ssh masters and removes it.
    """

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.workdir = Path(tempfile.mkdtemp(prefix="ckfleet-"))
        (self.workdir / "cp").mkdir()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def inventory(self) -> Path:
        if self.fleet.inventory is not None:
            return self.fleet.inventory
        f = self.fleet
        conn: dict[str, object] = {
            "ansible_user": f.ssh_user,
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        if f.ssh_key is not None:
            conn["ansible_ssh_private_key_file"] = str(f.ssh_key)
        groups: dict[str, object] = {
            GROUP: {"hosts": {h.name: {"ansible_host": h.address} for h in f.hosts}, "vars": conn}
        }
        if f.collector is not None:
            collector = (
                {"collector": {"ansible_host": f.collector, **conn}}
                if f.collector_ssh
                else {
                    "localhost": {
                        "ansible_connection": "local",
                        "ansible_python_interpreter": sys.executable,
                    }
                }
            )
            groups[COLLECTOR_GROUP] = {"hosts": collector}
        path = self.workdir / "inventory.json"  # JSON is YAML: Ansible's yaml plugin reads it
        path.write_text(json.dumps(groups, indent=1))
        return path

    def variables(self, **extra: object) -> dict[str, object]:
        f = self.fleet
        venv = str(Path(f.clusterkit).parent.parent)
        return {
            "clusterkit_name": f.spec.name,
            "clusterkit_config_b64": base64.b64encode(f.config_bytes).decode(),
            "clusterkit_bin": f.clusterkit,
            "clusterkit_package": f.package,
            "clusterkit_venv": venv,
            "clusterkit_runtime": f.runtime,
            "clusterkit_become": f.become,
            "clusterkit_collector_url": (
                ""
                if f.collector is None
                else f"http://{f'[{f.collector}]' if ':' in f.collector else f.collector}"
                f":{f.collector_port}"
            ),
            "clusterkit_collector_port": f.collector_port,
            "clusterkit_collector_max_use": f.collector_max_use,
            "clusterkit_host_addresses": [h.address for h in f.hosts],
            "clusterkit_controller": controller_command(),
            "clusterkit_haproxy_socket": str(f.haproxy_socket or ""),
            "clusterkit_haproxy_backend": f.backend,
            **extra,
        }

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        ssh_args = "-o ControlMaster=auto -o ControlPersist=60s -o BatchMode=yes"
        if self.fleet.known_hosts is not None:
            ssh_args += f" -o UserKnownHostsFile={self.fleet.known_hosts}"
            ssh_args += " -o StrictHostKeyChecking=yes"
        env.setdefault("ANSIBLE_CONFIG", str(empty_ansible_config(self.workdir)))
        env.update(
            ANSIBLE_HOME=str(self.workdir / "home"),
            ANSIBLE_LOCAL_TEMP=str(self.workdir / "tmp"),
            ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.workdir / "cp"),
            ANSIBLE_SSH_ARGS=ssh_args,
            ANSIBLE_PIPELINING="True",
            ANSIBLE_HOST_KEY_CHECKING="True",
            ANSIBLE_RETRY_FILES_ENABLED="False",
            ANSIBLE_ROLES_PATH=str(PLAYBOOK_DIR / "roles"),
            ANSIBLE_FORKS=str(min(max(len(self.fleet.hosts) + 1, 5), 50)),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_DEPRECATION_WARNINGS="False",
            ANSIBLE_INTERPRETER_PYTHON="/usr/bin/python3",
        )
        return env

    def play(
        self, playbook: str, *, capture: bool = False, **extra: object
    ) -> subprocess.CompletedProcess[str]:
        """Run ``clusterkit/ansible/PLAYBOOK.yml``; output to ours unless ``capture``."""
        variables = self.workdir / "vars.json"
        variables.write_text(json.dumps(self.variables(**extra)))
        argv = [
            *ansible_command("ansible-playbook"),
            "-i",
            str(self.inventory()),
            "-e",
            f"@{variables}",
            str(PLAYBOOK_DIR / f"{playbook}.yml"),
        ]
        out = subprocess.PIPE if capture else None
        # cwd: Ansible reads ./ansible.cfg when ANSIBLE_CONFIG is not set, and the current
        # directory may be the app's
        return subprocess.run(
            argv, env=self.environment(), stdout=out, stderr=out, text=True, cwd=self.workdir
        )

    def close(self) -> None:
        """End the ssh masters Ansible left (ControlPersist), then remove the directory."""
        for control in (self.workdir / "cp").iterdir():
            try:
                subprocess.run(
                    ["ssh", "-o", f"ControlPath={control}", "-O", "exit", "clusterkit-fleet"],
                    capture_output=True,
                    timeout=10,
                )
            except subprocess.TimeoutExpired:  # it ends by itself (ControlPersist=60s)
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)


# ---- HAProxy --------------------------------------------------------------------------


def haproxy_config(fleet: Fleet, bind: str, socket_path: str | None) -> str:
    """A complete HAProxy 2.6 configuration for the fleet (templates/haproxy.cfg.j2), with
    clusterkit's header: *bind* is checked (:func:`fleetspec.haproxy_bind`) by the caller."""
    from clusterkit.render import render_template
    from clusterkit.unitfiles import with_header

    hosts = [
        {"name": h.name, "address": f"[{h.address}]" if ":" in h.address else h.address}
        for h in fleet.hosts
    ]
    body = render_template(
        "haproxy.cfg.j2",
        backend=fleet.backend,
        hosts=hosts,
        port=fleet.port,
        bind=bind,
        socket=socket_path,
        health_path=fleet.health_path,
        health_host=fleet.health_host,
        server_timeout=f"{fleet.server_timeout}s",
    )
    return with_header("haproxy.cfg", body, command="fleet haproxy-config")


@dataclass
class HAProxy:
    """HAProxy's runtime API on a unix socket, for one backend."""

    socket_path: Path
    backend: str

    def command(self, line: str, timeout: float = 5) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(str(self.socket_path))
            except OSError as e:
                raise FleetFailure(
                    f"HAProxy runtime API {self.socket_path}: {e.strerror or e}"
                ) from None
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` rows of this backend's servers: name -> {status, scur, check_status…}."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            r["svname"]: r
            for r in rows
            if r.get("pxname") == self.backend and r.get("svname") not in ("FRONTEND", "BACKEND")
        }

    def server(self, name: str) -> dict[str, str]:
        row = self.servers().get(name)
        if row is None:
            raise FleetFailure(f"HAProxy has no server {self.backend}/{name}")
        return row

    def set_state(self, name: str, state: str) -> None:
        reply = self.command(f"set server {self.backend}/{name} state {state}").strip()
        if reply:
            raise FleetFailure(f"HAProxy: set server {self.backend}/{name} state {state}: {reply}")

    def wait(
        self, name: str, what: str, done: Callable[[dict[str, str]], bool], timeout: float
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.server(name)
            if done(row):
                return row
            if time.monotonic() > deadline:
                raise FleetFailure(
                    f"{self.backend}/{name}: not {what} after {timeout:g}s "
                    f"(status {row.get('status')}, {row.get('scur')} sessions)"
                )
            time.sleep(0.1)

    def drain(self, name: str, timeout: float) -> None:
        """Stop sending new requests to ``name``; wait until its sessions are 0."""
        self.set_state(name, "drain")
        self.wait(name, "idle", lambda r: r.get("scur") == "0", timeout)

    def ready(self, name: str, timeout: float) -> None:
        """Put ``name`` back into rotation; wait until its health check says UP."""
        self.set_state(name, "ready")
        self.wait(name, "UP", lambda r: r.get("status") == "UP", timeout)


def haproxy_view(fleet: Fleet) -> dict[str, dict[str, object]] | None:
    """Each server's HAProxy state, or None without a runtime API socket."""
    if fleet.haproxy_socket is None:
        return None
    rows = HAProxy(fleet.haproxy_socket, fleet.backend).servers()
    return {name: _server_view(r) for name, r in rows.items()}


def _server_view(row: dict[str, str]) -> dict[str, object]:
    # check_status is the last check's result; "* L7OK" while the next check runs
    # (HAProxy's management guide), so the marker goes into "checking"
    check = row.get("check_status") or ""
    return {
        "status": row.get("status"),
        "check": check.removeprefix("* ") or None,
        "checking": check.startswith("* "),
        "sessions": int(row.get("scur") or 0),
        "total_sessions": int(row.get("stot") or 0),
        "last_change_s": int(row.get("lastchg") or 0),
    }


# ---- status ---------------------------------------------------------------------------


def status(fleet: Fleet) -> tuple[list[dict[str, object]], str]:
    """Every host's ``clusterkit status --json`` (one play, all hosts in parallel) and HAProxy's
    view: (rows, Ansible's output when a host could not answer)."""
    with Runner(fleet) as runner:
        out_dir = runner.workdir / "status"
        out_dir.mkdir()
        r = runner.play("status", capture=True, clusterkit_out=str(out_dir))
        found = {p.stem: p.read_text() for p in out_dir.glob("*.json")}
    view = haproxy_view(fleet) or {}
    rows = []
    for h in fleet.hosts:
        row: dict[str, object] = {"host": h.name, "address": h.address}
        text = found.get(h.name)
        try:
            row["workers"] = json.loads(text) if text is not None else None
        except ValueError:
            row["workers"] = None
        row["reachable"] = row["workers"] is not None
        row["haproxy"] = view.get(h.name)
        rows.append(row)
    return rows, "" if r.returncode == 0 else (r.stdout or "") + (r.stderr or "")


# ---- events and logs from the collector ---------------------------------------------------

_REMOTE_FILE = re.compile(r"remote-(?P<address>[^@]+?)(@.*)?\.journal~?")


def collector_files(directory: Path) -> dict[str, list[str]]:
    """The collector's journal files by sender address (journal-remote names them so)."""
    found: dict[str, list[str]] = {}
    try:
        entries = sorted(directory.iterdir())
    except OSError as e:
        raise FleetFailure(f"collector directory {directory}: {e.strerror or e}") from None
    for path in entries:
        m = _REMOTE_FILE.fullmatch(path.name)
        if m is None:
            continue
        raw = m.group("address").strip("[]")
        try:
            address = str(ipaddress.ip_address(raw))
        except ValueError:
            continue
        found.setdefault(address, []).append(str(path))
    return found


@dataclass
class _Source:
    host: Host
    files: list[str]
    reader: object = None
    cursor: str | None = None


@dataclass
class FleetEvents:
    """Events (or log lines) of every host, one journal reader per sending host.

    A file is read only if its sender address (in its name) is an inventory host's;
    a record in it is shown as that host's, and dropped if its ``_HOSTNAME`` claims
    to be *another* inventory host. ``strangers`` collects the addresses of files
    that were ignored.
    """

    fleet: Fleet
    logs: bool = False
    strangers: set[str] = field(default_factory=set)
    _sources: dict[str, _Source] = field(default_factory=dict)

    def _refresh(self) -> None:
        for address, files in collector_files(self.fleet.collector_directory).items():
            host = self.fleet.host_by_address(address)
            if host is None:
                self.strangers.add(address)
                continue
            src = self._sources.get(host.name)
            if src is not None and src.files == files:
                continue
            cursor = src.cursor if src is not None else None
            if src is not None:
                src.reader.close()  # type: ignore[attr-defined]
            self._sources[host.name] = _Source(host, files, self._open(host, files, cursor), cursor)

    def _open(self, host: Host, files: list[str], cursor: str | None) -> object:
        others = {h.name for h in self.fleet.hosts if h.name != host.name}
        if self.logs:
            return _LogReader(self.fleet.spec.name, files, cursor, others)
        from clusterkit.events import EventReader

        class _HostReader(EventReader):
            def parse(self, entry: dict[str, object]) -> list:
                if entry.get("_HOSTNAME") in others:
                    return []  # a record from this host that claims to be another
                return super().parse(entry)

        return _HostReader(self.fleet.spec.name, files=files, cursor=cursor)

    def read(self) -> list[dict[str, object]]:
        """What arrived since the last call, oldest first, each with ``host`` and ``address``."""
        self._refresh()
        out = []
        for src in self._sources.values():
            reader = src.reader
            for item in reader:  # type: ignore[attr-defined]
                d = item if isinstance(item, dict) else item.to_json()
                out.append({"host": src.host.name, "address": src.host.address, **d})
            src.cursor = reader.cursor  # type: ignore[attr-defined]
        out.sort(key=lambda d: str(d["time"]))
        return out

    def follow(self, stop: Callable[[], bool] | None = None) -> Iterator[dict[str, object]]:
        while True:
            yield from self.read()
            if stop is not None and stop():
                return
            time.sleep(0.2)

    def close(self) -> None:
        for src in self._sources.values():
            src.reader.close()  # type: ignore[attr-defined]
        self._sources.clear()


class _LogReader:
    """The workers' own journal lines (``_SYSTEMD_UNIT=NAME@K.service``) in some files."""

    def __init__(self, name: str, files: list[str], cursor: str | None, others: set[str]):
        from clusterkit import journals

        self.name = name
        self.others = others
        self.cursor = cursor
        self._reader = journals.open_reader(files=files)
        if cursor:
            journals.seek_after(self._reader, cursor)
        else:
            self._reader.seek_head()

    def __iter__(self) -> Iterator[dict[str, object]]:
        from clusterkit.logs import log_line

        for entry in self._reader:  # up to the end of what is written now
            self.cursor = str(entry["__CURSOR"])
            if entry.get("_HOSTNAME") in self.others:
                continue
            line = log_line(entry, self.name, "_SYSTEMD_UNIT")
            if line is not None:
                unit = entry["_SYSTEMD_UNIT"]  # a worker's: log_line read its id from it
                yield {**line.to_json(), "unit": unit, "cursor": self.cursor}

    def close(self) -> None:
        self._reader.close()


__all__ = [
    "FleetError",
    "FleetEvents",
    "FleetFailure",
    "HAProxy",
    "Runner",
    "haproxy_config",
    "status",
]
