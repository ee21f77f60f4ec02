"""Installing generated units into a running systemd, and removing them.

Only files clusterkit wrote are copied or removed; drop-ins under
``NAME@.service.d/`` (``systemctl edit``) are the user's and are never touched,
so overrides survive a re-install.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from clusterkit import manifest, names, render, shadow, trust, unitfiles
from clusterkit.manager import Manager, ManagerError
from clusterkit.render import GENERATOR_PREFIX, file_names
from clusterkit.spec import UNIT_DIRECTORIES, Spec, SpecError


class InstallError(Exception):
    """Installing cannot proceed; the message says what to do."""


class InstallRefused(InstallError):
    """The input is not acceptable (exit 2): an untrusted source, a bad spec, a bad name."""


def check_running(manager: Manager) -> None:
    """InstallError saying what to do when ``manager`` is not running here."""
    if manager.is_running():
        return
    if manager.user:
        raise InstallError(
            "--user: no systemd user manager is running for this user "
            "(log in through a session, or enable lingering: loginctl enable-linger)"
        )
    raise InstallError(
        "systemd is not running as PID 1 on this machine, so units cannot be installed "
        "here; run `clusterkit up` to run them in a throwaway systemd container"
    )


def _systemctl(manager: Manager, *args: str) -> None:
    try:
        manager.systemctl(*args)
    except ManagerError as e:
        raise InstallError(str(e)) from None


def cluster_files(directory: Path, name: str) -> dict[str, Path]:
    """The clusterkit-written files of cluster ``name`` found in ``directory``."""
    return {n: directory / n for n in file_names(name) if unitfiles.is_ours(directory / n)}


def clusters_in(directory: Path) -> list[str]:
    """Names of the clusters whose spec manifest clusterkit wrote into ``directory``."""
    return sorted(
        p.name.removesuffix(manifest.SUFFIX)
        for p in directory.glob(f"*{manifest.SUFFIX}")
        if unitfiles.is_ours(p)
    )


def install(
    source: Path, name: str, manager: Manager, *, force: bool = False, now: bool = False
) -> unitfiles.WriteResult:
    """Install cluster ``name`` rendered afresh from its manifest in ``source``; enable it.

    Nothing in ``source`` is copied: the manifest is validated again and the
    units are rendered from it, and every unit file in ``source`` must be
    exactly what that renders (anything else was edited or forged).
    """
    if manager.user and os.geteuid() == 0:
        raise InstallRefused(
            "--user: root's own user manager would run the workers as root; install into "
            "the system manager instead (without --user), which runs them unprivileged"
        )
    spec = load_spec(source, name)
    _check_spec_for(spec, manager)
    files = render.files(spec)
    _check_source_matches(source, files)
    check_running(manager)
    # The manifest goes beside the units: the primary and the CLI read the
    # cluster's settings from it, never from unit text.
    generator = files.pop(f"{GENERATOR_PREFIX}{name}", None)
    stale = tuple(set(cluster_files(manager.unit_dir, name)) - set(files))
    done = unitfiles.write_all(manager.unit_dir, files, force=force, stale=stale)
    generated = _install_generator(manager, name, generator, force=force)
    _systemctl(manager, "daemon-reload")
    # An earlier version's file system for the back-off's records: its unit file is gone,
    # but it would stay mounted until reboot. The running workers keep their own view of
    # it until they restart into the new units.
    old_mounts = [n for n in stale if n.endswith(".mount")]
    if old_mounts:
        manager.systemctl("stop", *old_mounts, check=False)
    shared_socket = names.socket(name, names.SHARED)
    enable = [names.target(name)] + ([shared_socket] if shared_socket in files else [])
    _systemctl(manager, "enable", *enable)
    if now:  # not waiting for the workers: one that crash-loops would block for ever
        _systemctl(manager, "start", "--no-block", names.target(name))
    return unitfiles.WriteResult(
        done.written + generated.written,
        done.unchanged + generated.unchanged,
        done.removed + generated.removed,
    )


def load_spec(source: Path, name: str) -> Spec:
    """The validated spec of cluster ``name`` from its manifest in ``source``.

    As root, ``source`` and the manifest must be root's: owned by root and
    writable by nobody else, up to ``/``.
    """
    path = source / manifest.file_name(name)
    if trust.as_root():
        reason = trust.why_untrusted(path)
        if reason is not None:
            raise InstallRefused(
                f"--from: not installing from {source}: {reason}; root installs only from "
                "root's files: generate into a directory only root can write"
            )
    if unitfiles.state(path) != "clusterkit":
        raise InstallRefused(
            f"--from: no intact spec manifest {path} for cluster {name!r}; "
            f"run `clusterkit generate --name {name} --output {source}` first"
        )
    try:
        spec = manifest.loads(path.read_text(encoding="utf-8"), str(path))
    except SpecError as e:
        raise InstallRefused(str(e)) from None
    if spec.name != name:  # a renamed copy: its units and NAME's stale ones would mix
        raise InstallRefused(
            f"--from: {path} is the manifest of cluster {spec.name!r}, not {name!r}; "
            f"run `clusterkit generate --name {name} --output {source}` to make {name}'s"
        )
    return spec


def _check_spec_for(spec: Spec, manager: Manager) -> None:
    if manager.user and spec.manager != "user":
        raise InstallRefused(
            "--user: these units switch users (DynamicUser=/User=), which a user's manager "
            "cannot do; generate them with --manager user"
        )
    problem = shadow.refusal(spec.name, user=manager.user, root=manager.root)
    if problem is not None:
        raise InstallRefused(problem)
    _check_unit_directories(spec, manager)
    program = manager.root / spec.exec[0].lstrip("/")
    if not os.access(program, os.X_OK):
        raise InstallRefused(
            f"--exec: {spec.exec[0]} is not an executable file here; install the app first "
            "(or fix --exec and generate again)"
        )
    if spec.env_file is not None:
        problem = trust.secret_file_problem(Path(spec.env_file))
        if problem is not None:
            raise InstallRefused(
                f"--env-file: {problem}; make it root's: chown root:root, chmod 0600"
            )


_DYNAMIC_UIDS = range(61184, 65520)  # systemd's DynamicUser= uids


def _check_unit_directories(spec: Spec, manager: Manager) -> None:
    """Refuse a StateDirectory= (and the like) that exists and is not the workers' already:
    systemd hands it to them (chown, and with DynamicUser=yes a move into private/), so
    ``state-directory = "dpkg"`` would give a worker the package manager's scripts."""
    if spec.manager != "system":
        return
    for field, top in UNIT_DIRECTORIES:
        value = getattr(spec, field)
        if not value:
            continue
        try:
            owner = (manager.root / top.lstrip("/") / value).stat().st_uid
        except FileNotFoundError:
            continue
        if owner in ((_uid(manager.root, spec.run_as),) if spec.run_as else _DYNAMIC_UIDS):
            continue  # made for these workers by an earlier start
        raise InstallRefused(
            f"--{field.replace('_', '-')}: {top}/{value} exists and is owned by "
            f"{trust.owner_name(owner)}, and systemd would hand it to the workers; choose a "
            "directory of the cluster's own (or move that one away first)"
        )


def _uid(root: Path, user: str) -> int | None:
    """The uid of user name or id ``user`` on the system under ``root``: this host's
    (through NSS, as systemd looks it up), else a container's passwd file."""
    if user.isdigit():
        return int(user)
    if root == Path("/"):
        try:
            return pwd.getpwnam(user).pw_uid
        except KeyError:
            return None
    try:
        lines = (root / "etc/passwd").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(":")
        if len(fields) > 2 and fields[0] == user and fields[2].isdigit():
            return int(fields[2])
    return None


def _check_source_matches(source: Path, files: dict[str, str]) -> None:
    for file_name, text in files.items():
        path = source / file_name
        if unitfiles.state(path) != "missing" and _read(path) != text:
            raise InstallRefused(
                f"--from: {path} is not what its spec manifest renders (edited, forged, or "
                "from another clusterkit version); regenerate it with clusterkit generate"
            )


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _install_generator(
    manager: Manager, name: str, generator: str | None, *, force: bool
) -> unitfiles.WriteResult:
    """Install the generator of an "auto" cluster, or remove the one a fixed count replaces."""
    generator_name = f"{GENERATOR_PREFIX}{name}"
    if manager.generator_dir is None:
        _wants_per_cpu(manager.unit_dir, name, count=None if generator is None else _cpus())
        return unitfiles.WriteResult((), (), ())
    new = {} if generator is None else {generator_name: generator}
    return unitfiles.write_all(
        manager.generator_dir,
        new,
        force=force,
        stale=(generator_name,),
        executable=(generator_name,),
    )


def uninstall(name: str, manager: Manager) -> list[str]:
    """Stop and disable cluster ``name`` and remove the files clusterkit installed."""
    check_running(manager)
    files = cluster_files(manager.unit_dir, name)
    if not files:
        raise InstallError(f"cluster {name!r} is not installed in {manager.unit_dir}")
    # Best effort: a unit that is already gone is fine. Not `disable --now`: its stop waits
    # for the workers with no bound (systemctl_bounded has one).
    target, shared_socket = names.target(name), names.socket(name, names.SHARED)
    manager.systemctl("disable", target, shared_socket, check=False)
    workers = f"{name}@*.service"
    manager.systemctl_bounded(
        "stop",
        target,
        shared_socket,
        workers,
        f"{name}@*.socket",
        names.back_off(name, "*"),
        names.back_off_mount(name, dynamic_user=True),
        names.back_off_mount(name, dynamic_user=False),
        units=[workers],
        check=False,
    )
    # a worker killed on the way out (or one that had failed) would stay listed as failed
    manager.systemctl("reset-failed", workers, f"{name}@*.socket", check=False)
    # Under the directory's lock, through its descriptor: never through a symlink.
    removed = list(unitfiles.write_all(manager.unit_dir, {}, stale=tuple(files)).removed)
    if manager.generator_dir is not None:
        generator = manager.generator_dir / f"{GENERATOR_PREFIX}{name}"
        if unitfiles.is_ours(generator):
            generator.unlink()
            removed.append(generator.name)
    _wants_per_cpu(manager.unit_dir, name, count=None)
    _systemctl(manager, "daemon-reload")
    return removed


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def _wants_dir(unit_dir: Path, name: str) -> Path | None:
    """NAME.target.wants when it is a real directory; never followed if it is a symlink."""
    wants = unit_dir / f"{name}.target.wants"
    return wants if wants.is_dir() and not wants.is_symlink() else None


def _wants_per_cpu(unit_dir: Path, name: str, count: int | None) -> None:
    """A user's manager: NAME.target wants ``count`` workers (None: remove those links)."""
    wants = _wants_dir(unit_dir, name)
    if wants is None and count is not None:
        if (unit_dir / f"{name}.target.wants").is_symlink():
            raise InstallRefused(f"{unit_dir / name}.target.wants is a symlink; remove it first")
        wants = unit_dir / f"{name}.target.wants"
        wants.mkdir()
    if wants is None:
        return
    for old in wants.glob(f"{name}@*.service"):
        if old.is_symlink():
            old.unlink()
    for i in range(count or 0):
        (wants / f"{name}@{i}.service").symlink_to(unit_dir / f"{name}@.service")
    if count is None and not any(wants.iterdir()):
        wants.rmdir()
