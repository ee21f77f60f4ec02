"""The fleet's input, checked: ``[tool.clusterkit.fleet]`` and an Ansible inventory.

The counterpart of :mod:`clusterkit.spec` for several hosts, and the only place
that checks the fleet's input. Every error is a :class:`FleetError` naming the
field (``fleet.hosts``, ``inventory: host web1``…), printed on one line with exit
status 2.

The hosts come from ``hosts`` (a table: inventory name = address) or from a
standard Ansible inventory (``inventory``, or ``--inventory``), group
``clusterkit``. Every host needs an IP address (``ansible_host``, or a name that
is one): the collector names each uploader's journal file after the address it
connected from, and that is the only proof of who sent a record.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterkit import trust
from clusterkit.spec import Spec, SpecError, build_spec, clusterkit_table, parse_config, read_config

GROUP = "clusterkit"
COLLECTOR_GROUP = "clusterkit_collector"
_HOST_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")
#: a path (and query) HAProxy's configuration holds as one word: no quote, backslash or #
_HTTP_PATH = re.compile(r"/[A-Za-z0-9._~!$&()*+,;=:@%/?-]*")
#: a Host header value: a host name, an IPv4 address or a bracketed IPv6 one, maybe a port
_HTTP_HOST = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_SIZE = re.compile(r"[1-9][0-9]{0,5}[KMGT]")  # journalctl's size syntax, from 1K on
#: a path HAProxy's configuration holds as one word: no space, quote, backslash or #
_CONFIG_PATH = re.compile(r"/[A-Za-z0-9_./@+-]*")


class FleetError(ValueError):
    """Bad fleet input: the message names the field."""


@dataclass(frozen=True)
class Host:
    name: str  # the inventory name; HAProxy's server name
    address: str  # where ssh, HAProxy and the collector see it


@dataclass(frozen=True)
class Fleet:
    """A validated fleet: the cluster, its hosts and how to reach the pieces."""

    spec: Spec  # the cluster every host runs
    config_path: Path  # the pyproject.toml copied to every host
    config_bytes: bytes  # what it held when it was checked: what is copied
    hosts: tuple[Host, ...]
    inventory: Path | None  # the user's own inventory, or None: rendered from ``hosts``
    ssh_user: str = "root"
    ssh_key: Path | None = None
    known_hosts: Path | None = None
    become: bool = False
    clusterkit: str = "/opt/clusterkit/bin/clusterkit"  # the CLI on each host
    package: str = "clusterkit-systemd"  # pip requirement installed there ("" = already installed)
    runtime: bool = False  # install --runtime (units gone at reboot)
    port: int = 3000  # the port every host serves on (HAProxy's servers)
    health_path: str = "/"
    health_host: str = ""  # the Host header of HAProxy's health check ("": HTTP/1.0, none)
    collector: str | None = None  # the address the hosts upload their journal to
    collector_port: int = 19532
    collector_ssh: bool = False  # configure the collector over ssh (else: this machine)
    collector_directory: Path = Path("/var/log/journal/remote")  # as this machine sees it
    #: what the collector's files may take (journalctl --vacuum-size=): journal-remote of
    #: systemd 252 never deletes a file, and any host can upload as fast as it can send
    collector_max_use: str = "4G"
    haproxy_socket: Path | None = None  # HAProxy's runtime API (drain, ready, status)
    #: seconds HAProxy waits for a host's response (``timeout server``): a slower request
    #: gets 504, and an idempotent one is first tried again, on up to 3 more hosts
    server_timeout: int = 30
    haproxy_backend: str = ""  # default: the cluster's name

    @property
    def backend(self) -> str:
        return self.haproxy_backend or self.spec.name

    def host_by_address(self, address: str) -> Host | None:
        wanted = ipaddress.ip_address(address)
        return next((h for h in self.hosts if ipaddress.ip_address(h.address) == wanted), None)


_KEYS = {
    "hosts",
    "inventory",
    "ssh_user",
    "ssh_key",
    "known_hosts",
    "become",
    "clusterkit",
    "package",
    "runtime",
    "port",
    "health_path",
    "health_host",
    "collector",
    "collector_port",
    "collector_ssh",
    "collector_directory",
    "collector_max_use",
    "haproxy_socket",
    "haproxy_backend",
    "server_timeout",
}


def load_fleet(config_path: Path, inventory: Path | None = None) -> Fleet:
    """Read and check the cluster and its ``[tool.clusterkit.fleet]`` table (the file is read
    once: the bytes checked are the bytes copied to the hosts)."""
    try:
        raw = read_config(config_path)
        document = parse_config(raw, config_path)
        spec = build_spec(clusterkit_table(document, config_path), {})
    except SpecError as e:
        raise FleetError(str(e)) from None
    table = document.get("tool", {}).get("clusterkit", {}).get("fleet")
    if not isinstance(table, dict):
        raise FleetError(f"fleet: {config_path} has no [tool.clusterkit.fleet] table")
    return build_fleet(spec, config_path, table, inventory, config_bytes=raw)


def build_fleet(
    spec: Spec,
    config_path: Path,
    table: dict[str, Any],
    inventory: Path | None,
    *,
    config_bytes: bytes,
) -> Fleet:
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise FleetError(f"fleet.{unknown[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")
    base = config_path.resolve().parent
    kw: dict[str, Any] = {}
    for key in ("ssh_user", "clusterkit", "package", "haproxy_backend"):
        if key in table:
            kw[key] = _text(key, table[key], allow_empty=key == "package")
    if "ssh_user" in kw and not re.fullmatch(r"[a-z_][a-z0-9_-]*", kw["ssh_user"]):
        raise FleetError(f"fleet.ssh_user: {kw['ssh_user']!r} is not a user name")
    if "clusterkit" in kw and not kw["clusterkit"].startswith("/"):
        raise FleetError(f"fleet.clusterkit: {kw['clusterkit']!r} must be an absolute path")
    if "clusterkit" in table and "package" not in table:
        kw["package"] = ""  # a CLI the operator installed: do not pip-install over it
    if "haproxy_backend" in kw:
        haproxy_name("fleet.haproxy_backend", kw["haproxy_backend"])
    for key in ("become", "runtime", "collector_ssh"):
        if key in table:
            if not isinstance(table[key], bool):
                raise FleetError(f"fleet.{key}: expected true or false")
            kw[key] = table[key]
    for key, highest, what in (
        ("port", 65535, "a port"),
        ("collector_port", 65535, "a port"),
        ("server_timeout", 3600, "whole seconds"),
    ):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= highest:
                raise FleetError(f"fleet.{key}: {value!r} is not {what} (1-{highest})")
            kw[key] = value
    if "port" not in kw:
        tcp = [listen.port for listen in spec.listen if listen.port is not None]
        if not tcp:
            raise FleetError("fleet.port: the cluster listens on no TCP port; set fleet.port")
        kw["port"] = tcp[0]
    if "health_path" in table:
        path = _text("health_path", table["health_path"])
        if not _HTTP_PATH.fullmatch(path):
            raise FleetError(f"fleet.health_path: {path!r} is not an HTTP path starting with /")
        kw["health_path"] = path
    if "health_host" in table:
        host = _text("health_host", table["health_host"])
        if not _HTTP_HOST.fullmatch(host):
            raise FleetError(
                f"fleet.health_host: {host!r} is not a host name or address, with an optional :port"
            )
        kw["health_host"] = host
    for key in ("ssh_key", "known_hosts", "collector_directory", "haproxy_socket"):
        if key in table:
            kw[key] = base / _text(key, table[key])
    if "haproxy_socket" in kw and not _CONFIG_PATH.fullmatch(str(kw["haproxy_socket"])):
        raise FleetError(
            f"fleet.haproxy_socket: {str(kw['haproxy_socket'])!r} cannot be written into "
            "HAProxy's configuration: use letters, digits and ._-/@+ only"
        )
    if "collector" in table:
        kw["collector"] = _address("fleet.collector", table["collector"])
    if "collector_max_use" in table:
        size = _text("collector_max_use", table["collector_max_use"])
        if not _SIZE.fullmatch(size):
            raise FleetError(f"fleet.collector_max_use: {size!r} is not a size such as 500M or 4G")
        kw["collector_max_use"] = size
    if kw.get("ssh_user", "root") != "root" and "become" not in kw:
        kw["become"] = True
    for key in ("ssh_key", "known_hosts"):
        if key in kw:
            _check_roots(f"fleet.{key}", kw[key])
    # the place where they are: the socket and the directory themselves are their
    # services' (HAProxy's group may write its socket, journal-remote owns its directory)
    for key in ("collector_directory", "haproxy_socket"):
        if key in kw:
            _check_roots(f"fleet.{key}", kw[key].parent)
    if inventory is None and "inventory" in table:
        inventory = base / _text("inventory", table["inventory"])
    if inventory is not None:
        if "hosts" in table:
            raise FleetError("fleet.hosts: give hosts or an inventory, not both")
        inventory = inventory.absolute()  # Ansible runs in a directory of its own
        _check_roots("inventory", inventory)
        hosts = hosts_from_inventory(inventory)
    elif "hosts" in table:
        hosts = _hosts_table(table["hosts"])
    else:
        raise FleetError("fleet.hosts: no hosts (a table name = address, or fleet.inventory)")
    return Fleet(spec, config_path.resolve(), config_bytes, hosts, inventory, **kw)


def _check_roots(field: str, path: Path) -> None:
    """As root, refuse a path of the fleet's that another user can change: an inventory is
    run by ansible-inventory (a script, or plugins and vars beside it), the ssh key and
    known_hosts decide whom root's ssh trusts, the collector's directory holds the hosts'
    events, HAProxy's socket is what `fleet status` and `lb` believe (for these two, the
    directory they are in)."""
    if not trust.as_root():
        return
    reason = trust.why_untrusted(path)
    if reason is None and field == "inventory":
        # Ansible reads group_vars/ and host_vars/ beside a file, and every file in a directory
        beside = (
            [path] if path.is_dir() else [path.parent / "group_vars", path.parent / "host_vars"]
        )
        reason = next(filter(None, map(_tree_reason, beside)), None)
    if reason is not None:
        raise FleetError(
            f"{field}: not using {path}: {reason}; as root, the fleet uses only root's files "
            "(chown root, chmod go-w)"
        )


def _tree_reason(top: Path) -> str | None:
    for directory, subdirectories, files in os.walk(top):
        for name in [*subdirectories, *files]:
            reason = trust.why_untrusted(Path(directory, name))
            if reason is not None:
                return reason
    return None


def _text(key: str, raw: Any, allow_empty: bool = False) -> str:
    if not isinstance(raw, str) or (not raw and not allow_empty):
        raise FleetError(f"fleet.{key}: expected a non-empty string")
    if any(ch in raw for ch in "\n\r\0") or any(ord(ch) < 32 for ch in raw):
        raise FleetError(f"fleet.{key}: control characters are not allowed")
    return raw


def _address(field: str, raw: Any) -> str:
    if not isinstance(raw, str):
        raise FleetError(f"{field}: expected an IP address string")
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise FleetError(f"{field}: {raw!r} is not an IP address") from None


def _hosts_table(raw: Any) -> tuple[Host, ...]:
    if not isinstance(raw, dict) or not raw:
        raise FleetError("fleet.hosts: expected a table of name = address, with at least one host")
    return _checked_hosts(
        [(name, _address(f"fleet.hosts.{name}", addr)) for name, addr in raw.items()],
        "fleet.hosts",
    )


def _checked_hosts(pairs: list[tuple[str, str]], field: str) -> tuple[Host, ...]:
    seen: dict[str, str] = {}
    for name, address in pairs:
        if not _HOST_NAME.fullmatch(name):
            raise FleetError(f"{field}: {name!r} is not a host name (letters, digits, . _ -)")
        if address in seen:
            raise FleetError(f"{field}: {name} and {seen[address]} share the address {address}")
        seen[address] = name
    return tuple(Host(n, a) for n, a in pairs)


def hosts_from_inventory(path: Path) -> tuple[Host, ...]:
    """The hosts of group ``clusterkit`` in an Ansible inventory, parsed by Ansible itself."""
    from clusterkit.fleet import ansible_command, empty_ansible_config

    if not path.exists():
        raise FleetError(f"inventory: {path} does not exist")
    with tempfile.TemporaryDirectory(prefix="ckfleet-") as home:
        # In a directory of its own, with a config of its own: the current directory may
        # be the app's, and its ansible.cfg's plugins would run as root.
        env = {
            "ANSIBLE_CONFIG": str(empty_ansible_config(Path(home))),
            **os.environ,
            "ANSIBLE_HOME": home,
            "ANSIBLE_LOCAL_TEMP": f"{home}/tmp",
        }
        r = subprocess.run(
            [*ansible_command("ansible-inventory"), "-i", str(path.absolute()), "--list"],
            capture_output=True,
            text=True,
            env=env,
            cwd=home,
        )
    try:
        data = json.loads(r.stdout) if r.returncode == 0 else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        detail = (r.stderr.strip().splitlines() or ["unreadable"])[-1]
        raise FleetError(f"inventory: {path} cannot be parsed by ansible-inventory: {detail}")
    group = data.get(GROUP)
    names = group.get("hosts") if isinstance(group, dict) else None
    if not names:
        raise FleetError(f"inventory: {path} has no hosts in group [{GROUP}]")
    hostvars = data.get("_meta", {}).get("hostvars", {})
    pairs = []
    for name in names:
        raw = hostvars.get(name, {}).get("ansible_host", name)
        pairs.append((name, _address(f"inventory: host {name}: ansible_host", raw)))
    return _checked_hosts(pairs, "inventory")


def haproxy_bind(flag: str, raw: str) -> str:
    """HAProxy's frontend address from *flag* (``--bind``): ``ADDRESS:PORT``, where ADDRESS is
    ``*`` or nothing (every address), an IP address (IPv6 in brackets) or a host name."""
    address, colon, port = raw.rpartition(":")
    problem = None
    if not colon or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        problem = "no :PORT (1-65535) at its end"
    elif address.startswith("[") and address.endswith("]"):
        try:
            ipaddress.IPv6Address(address[1:-1])
        except ValueError:
            problem = f"{address} is not an IPv6 address in brackets"
    elif address not in ("*", "") and not _HOST_NAME.fullmatch(address):
        problem = f"{address!r} is not *, an IP address or a host name"
    elif re.fullmatch(r"[0-9.]+", address):
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            problem = f"{address} is not an IPv4 address"
    if problem is not None:
        raise FleetError(
            f"{flag}: {raw!r}: {problem}; give ADDRESS:PORT, e.g. *:80, 198.18.0.1:80, [::]:80"
        )
    return raw


def haproxy_name(flag: str, raw: str) -> str:
    """A server or backend name for HAProxy's configuration and runtime API, where ``;`` and
    a newline would start another command: letters, digits, ``_``, ``.`` and ``-`` only."""
    if not _HOST_NAME.fullmatch(raw):
        raise FleetError(f"{flag}: {raw!r} is not a name (letters, digits, _ . - only)")
    return raw
