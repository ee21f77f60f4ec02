"""Installing generated units into a running systemd, and removing them.

Only files clusterkit wrote are copied or removed; drop-ins under
``NAME@.service.d/`` (``systemctl edit``) are the user's and are never touched,
so overrides survive a re-install.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from clusterkit import unitfiles
from clusterkit.render import GENERATOR_PREFIX, file_names


class InstallError(Exception):
    """Installing cannot proceed; the message says what to do."""


@dataclass(frozen=True)
class Manager:
    """A systemd instance to install into: the system's, or the calling user's."""

    unit_dir: Path
    generator_dir: Path | None
    systemctl: tuple[str, ...]
    user: bool

    @classmethod
    def for_scope(cls, *, runtime: bool = False, user: bool = False) -> Manager:
        if user:
            config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
            # A user's manager has no generator directory of its own: the workers
            # of an "auto" cluster are counted at install time instead.
            return cls(config / "systemd" / "user", None, ("systemctl", "--user"), True)
        base = Path("/run/systemd/system" if runtime else "/etc/systemd/system")
        return cls(base, Path(f"{base}-generators"), ("systemctl",), False)

    def check_running(self) -> None:
        if self.user:
            runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
            if not Path(runtime, "systemd", "private").exists():
                raise InstallError(
                    "--user: no systemd user manager is running for this user "
                    "(log in through a session, or enable lingering: loginctl enable-linger)"
                )
        elif not Path("/run/systemd/system").is_dir():
            raise InstallError(
                "systemd is not running as PID 1 on this machine, so units cannot be installed "
                "here; run `clusterkit up` to run them in a throwaway systemd container"
            )

    def run(self, *args: str) -> None:
        result = subprocess.run([*self.systemctl, *args], capture_output=True, text=True)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise InstallError(
                f"{' '.join([*self.systemctl, *args])} failed: {detail[-1] if detail else '?'}"
            )


def cluster_files(directory: Path, name: str) -> dict[str, Path]:
    """The clusterkit-written files of cluster ``name`` found in ``directory``."""
    return {n: directory / n for n in file_names(name) if unitfiles.is_ours(directory / n)}


def clusters_in(directory: Path) -> list[str]:
    """Names of the clusters whose units clusterkit wrote into ``directory``."""
    return sorted(
        p.name.removesuffix(".target")
        for p in directory.glob("*.target")
        if unitfiles.is_ours(p) and (directory / f"{p.stem}@.service").exists()
    )


def install(
    source: Path, name: str, manager: Manager, *, force: bool = False, now: bool = False
) -> list[str]:
    """Copy cluster ``name``'s files from ``source``, reload, enable; start with ``now``."""
    files = cluster_files(source, name)
    if f"{name}@.service" not in files:
        raise InstallError(
            f"no units for cluster {name!r} in {source}; "
            f"run `clusterkit generate --name {name}` first"
        )
    service_text = files[f"{name}@.service"].read_text()
    if manager.user and ("DynamicUser=yes" in service_text or "\nUser=" in service_text):
        raise InstallError(
            "--user: these units switch users (DynamicUser=/User=), which a user's manager "
            "cannot do; generate them with --manager user"
        )
    manager.check_running()
    generator = files.pop(f"{GENERATOR_PREFIX}{name}", None)
    texts = {n: p.read_text() for n, p in files.items()}
    stale = tuple(
        set(cluster_files(manager.unit_dir, name)) - set(texts) - {generator and generator.name}
    )
    done = unitfiles.write_all(manager.unit_dir, texts, force=force, stale=stale)
    if generator is not None:
        if manager.generator_dir is None:
            _wants_per_cpu(manager.unit_dir, name)
        else:
            unitfiles.write_all(
                manager.generator_dir,
                {generator.name: generator.read_text()},
                force=force,
                executable=(generator.name,),
            )
    manager.run("daemon-reload")
    enable = [f"{name}.target"] + ([f"{name}.socket"] if f"{name}.socket" in texts else [])
    manager.run("enable", *enable)
    if now:
        manager.run("start", f"{name}.target")
    return [*done.written, *done.unchanged]


def uninstall(name: str, manager: Manager) -> list[str]:
    """Stop and disable cluster ``name`` and remove the files clusterkit installed."""
    manager.check_running()
    files = cluster_files(manager.unit_dir, name)
    if not files:
        raise InstallError(f"cluster {name!r} is not installed in {manager.unit_dir}")
    subprocess.run(
        [*manager.systemctl, "disable", "--now", f"{name}.target", f"{name}.socket"],
        capture_output=True,
    )
    subprocess.run(
        [*manager.systemctl, "stop", f"{name}@*.service", f"{name}@*.socket"], capture_output=True
    )
    removed = []
    for file_name, path in files.items():
        path.unlink()
        removed.append(file_name)
    if manager.generator_dir is not None:
        generator = manager.generator_dir / f"{GENERATOR_PREFIX}{name}"
        if unitfiles.is_ours(generator):
            generator.unlink()
            removed.append(generator.name)
    wants = manager.unit_dir / f"{name}.target.wants"
    if wants.is_dir():
        for link in wants.glob(f"{name}@*.service"):
            link.unlink()
        if not any(wants.iterdir()):
            wants.rmdir()
    manager.run("daemon-reload")
    return removed


def _wants_per_cpu(unit_dir: Path, name: str) -> None:
    wants = unit_dir / f"{name}.target.wants"
    wants.mkdir(exist_ok=True)
    for old in wants.glob(f"{name}@*.service"):
        old.unlink()
    for i in range(len(os.sched_getaffinity(0))):
        (wants / f"{name}@{i}.service").symlink_to(unit_dir / f"{name}@.service")
