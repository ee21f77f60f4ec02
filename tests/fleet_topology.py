"""A network of systemd hosts for the fleet test (DESIGN.md, "Several hosts").

- :class:`Lan`: a "LAN" network namespace with a Linux bridge at ``198.18.0.1/24``,
  and one more namespace per host joined to the bridge by a veth pair. Addresses
  come from 198.18.0.0/24 only; nothing is routed anywhere else.
- :func:`boot_host`: a :class:`~clusterkit.container.Container` in a host's
  namespace, with sshd (a host key made here, root's authorized key, ``UsePAM no``,
  run as a transient unit: Debian's ``ssh.service`` stays masked) for Ansible, and
  the units the caller unmasks.
- :class:`SshKeys`: the controller's key pair and the hosts' key, pinned in a
  private ``known_hosts``.

Everything made here is removed by :meth:`Lan.close` (namespaces: ``ip netns del``),
and containers by the caller's ``poweroff``.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from clusterkit.container import Container

SUBNET = "198.18.0"
LAN_ADDRESS = f"{SUBNET}.1"


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@dataclass
class Lan:
    """The LAN namespace and the hosts' namespaces; see the module docstring."""

    prefix: str = field(default_factory=lambda: f"ckf{secrets.token_hex(3)}")
    namespaces: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.prefix}-lan"

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def create(self) -> Lan:
        _ip("netns", "add", self.name)
        self.namespaces.append(self.name)
        _ip("-n", self.name, "link", "set", "lo", "up")
        _ip("-n", self.name, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.name, "addr", "add", f"{LAN_ADDRESS}/24", "dev", "br0")
        _ip("-n", self.name, "link", "set", "br0", "up")
        return self

    def add_address(self, address: str) -> None:
        """One more address of the LAN namespace (a stranger on the LAN)."""
        _ip("-n", self.name, "addr", "add", f"{address}/24", "dev", "br0")

    def add_host(self, index: int, address: str | None = None) -> tuple[str, str]:
        """A namespace for host ``index`` (at ``198.18.0.(10+index)`` unless ``address``
        says): (its path, its address)."""
        ns = f"{self.prefix}-h{index}"
        address = address or f"{SUBNET}.{10 + index}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip(
            "-n", self.name, "link", "add", f"v{index}", "type", "veth", "peer", "eth0", "netns", ns
        )
        _ip("-n", self.name, "link", "set", f"v{index}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        return f"/run/netns/{ns}", address

    def cut(self, index: int) -> None:
        """Take host ``index``'s link down on the bridge side: it goes silent."""
        _ip("-n", self.name, "link", "set", f"v{index}", "down")

    def mend(self, index: int) -> None:
        _ip("-n", self.name, "link", "set", f"v{index}", "up")

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run in the LAN's network namespace (only: the file system is this one's)."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()


@dataclass
class SshKeys:
    """Ansible's key and the hosts' key (one for all: they are throwaway containers)."""

    directory: Path

    def create(self) -> SshKeys:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in ("client", "host"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.directory / name)],
                check=True,
            )
        return self

    @property
    def client_key(self) -> Path:
        return self.directory / "client"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    def pin(self, addresses: list[str]) -> None:
        key = (self.directory / "host.pub").read_text().split()[:2]
        self.known_hosts.write_text("".join(f"{a} {' '.join(key)}\n" for a in addresses))


SSHD_CONFIG = """\
# the fleet test's sshd: root with a key only, no PAM (volatile /etc has no PAM setup)
ListenAddress {address}
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile /etc/ssh/authorized_keys/%u
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def boot_host(
    name: str,
    netns: str,
    address: str,
    keys: SshKeys,
    *,
    unmask: tuple[str, ...] = (),
    binds: tuple[str, ...] = (),
) -> Container:
    """Boot a container in ``netns`` and start sshd on ``address`` for Ansible."""
    c = Container(name, network_namespace=netns, unmask=unmask, binds=binds)
    c.start()
    try:
        c.write_file("/etc/ssh/sshd_config", SSHD_CONFIG.format(address=address))
        c.write_file(
            "/etc/ssh/ssh_host_ed25519_key", (keys.directory / "host").read_text(), mode=0o600
        )
        c.write_file("/etc/ssh/ssh_host_ed25519_key.pub", (keys.directory / "host.pub").read_text())
        c.write_file("/etc/ssh/authorized_keys/root", (keys.directory / "client.pub").read_text())
        # sshd refuses a locked account ("!" in /etc/shadow) even for key logins without PAM
        c.run("usermod", "-p", "*", "root", check=True)
        # Debian's postinst makes sshd's privilege separation user; /etc starts empty here
        c.run("systemd-sysusers", "-", input='u sshd - "sshd" /run/sshd\n', check=True)
        # Not Debian's ssh.service, which starts (and fails, without a config) at boot: a
        # unit of our own, started once everything is in place.
        c.run(
            "systemd-run", "--unit=ck-sshd", "-p", "RuntimeDirectory=sshd",
            "/usr/sbin/sshd", "-D", "-e", check=True,
        )  # fmt: skip
    except BaseException:
        c.poweroff()
        raise
    return c
