"""Which files a root command may take input from, and where it may write.

clusterkit runs as root and hands what it reads to systemd, which runs more of
it as root (DESIGN.md, "Trust"). A file is root's when it, and every directory
above it, is owned by root (or the caller) and nobody else can write it: then
no other user can change what it holds, or swap it for another file, between
the check and the read. A sticky directory (``/tmp``) is fine above a
root-owned entry, since others cannot rename or delete that entry.

The checks apply when the command runs as root; an unprivileged caller can
only hurt itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import pwd
import stat
import sys
from pathlib import Path


def as_root() -> bool:
    """True when the caller is root, whose commands must not trust other users' files."""
    return os.geteuid() == 0


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def why_untrusted(path: Path) -> str | None:
    """Why another user could change what ``path`` holds (one phrase), or None.

    Checks the path as written and as resolved, so that neither a symlink in it
    nor the directories it points into are under another user's control. A path
    that does not exist yet is checked as far as it exists.
    """
    absolute = Path(os.path.abspath(path))
    for candidate in dict.fromkeys([absolute, Path(os.path.realpath(absolute))]):
        reason = _chain_reason(candidate)
        if reason is not None:
            return reason
    return None


#: what Python imports or runs from a directory on sys.path (.pth: at start-up)
_IMPORTABLE = frozenset({".py", ".pyc", ".pth", ".so", ".zip", ".egg"})


class UntrustedCode(BaseException):
    """Root was about to run code another user could have changed; the message says which.
    Not an Exception: code that catches every error (ansible's, at import) must not carry
    on without the module, or try another way to the same code."""


class _CodeCheck:
    """Whether another user could change a file Python runs, its directories remembered."""

    def __init__(self) -> None:
        self._directories: dict[Path, str | None] = {}

    def directory_reason(self, directory: Path) -> str | None:
        if directory not in self._directories:
            self._directories[directory] = why_untrusted(directory)
        return self._directories[directory]

    def file_reason(self, path: Path) -> str | None:
        try:
            st = os.lstat(path)
        except OSError:
            return None  # gone, or never there: nothing to run
        if stat.S_ISLNK(st.st_mode):
            return why_untrusted(path)  # the link and its target, every directory above
        # a sticky directory in it (/tmp in /) is as fine as above a path: only root makes
        # one there, under a name no code imports
        last = not stat.S_ISDIR(st.st_mode)
        return self.directory_reason(path.parent) or _entry_reason(path, st, last=last)

    def whole_tree_reason(self, top: Path) -> str | None:
        """*top* itself (every directory above it too), then every file under it."""
        return self.directory_reason(top) or self.tree_reason(top)

    def tree_reason(self, top: Path) -> str | None:
        seen: set[str] = set()
        for directory, subdirectories, files in os.walk(top, followlinks=True):
            real = os.path.realpath(directory)
            if real in seen:  # a symlink loop
                subdirectories.clear()
                continue
            seen.add(real)
            for name in subdirectories + files:
                reason = self.file_reason(Path(directory, name))
                if reason is not None:
                    return reason
        return None


def why_code_untrusted() -> str | None:
    """Why another user could change the code that runs as clusterkit here, or None.

    What Python runs: the interpreter and its environment's ``pyvenv.cfg``; every
    directory on ``sys.path`` (the current one too, under ``-m``) and what lies directly
    in it (a ``.pth`` file runs at start-up, a module there shadows the standard
    library's); every module imported so far; and every file of the clusterkit package
    and its templates, which write the units. A symlink counts as its target. What is
    imported later (jinja2, the journal's bindings) :func:`guard_imports` checks as it
    is found.

    Checked by root's commands before they act. Code already changed has run by then, so
    this catches the set-up, not the attack: clusterkit installed into the app's own
    venv, which README step 0 once suggested, lets the app's user run code as root.
    """
    check = _CodeCheck()
    package = Path(__file__).resolve().parent
    for path in (Path(sys.executable), Path(sys.prefix, "pyvenv.cfg")):
        reason = check.file_reason(path)
        if reason is not None:
            return reason
    cwd = os.getcwd()
    for entry in sys.path:
        directory = Path(entry or cwd)
        reason = check.directory_reason(directory)
        if reason is None and directory.is_dir():
            for child in sorted(directory.iterdir()):  # what an import can find there
                if child.is_dir() or child.suffix in _IMPORTABLE:
                    reason = check.file_reason(child)
                    if reason is not None:
                        break
        if reason is not None:
            if str(directory) == cwd:  # python -m puts it first; the clusterkit command does not
                return f"{reason} (in the current directory, where `python -m` imports from)"
            return reason
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        reason = check.file_reason(Path(path)) if isinstance(path, str) else None
        if reason is not None:
            return reason
    # the templates: in the package (a wheel) or beside it (a checkout), as render finds them
    for top in (package, package.parent / "templates"):
        reason = check.whole_tree_reason(top)
        if reason is not None:
            return reason
    return None


def why_tree_untrusted(top: Path) -> str | None:
    """Why another user could change ``top`` or a file under it, or None (a program run
    as root, such as ansible-core's, whose imports this process does not see)."""
    return _CodeCheck().whole_tree_reason(top)


class _TrustedFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: asks the finders after it, as Python would, and refuses a
    module another user could change: its source, bytecode, extension module or zip
    archive, or a directory above them. Every finder, not only the path's: an editable
    install's finder maps a package to its source tree wherever that is."""

    def __init__(self) -> None:
        self._check = _CodeCheck()

    def find_spec(self, name: str, path=None, target=None):  # noqa: ANN001 - the protocol's
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                self._refuse_untrusted(name, spec)
                return spec
        return None

    def _refuse_untrusted(self, name: str, spec: importlib.machinery.ModuleSpec) -> None:
        archive = getattr(spec.loader, "archive", None)  # zipimport's
        files = [
            Path(f)
            for f in (spec.origin, spec.cached, archive)
            if isinstance(f, str) and os.path.isabs(f)
        ]
        # __pycache__ may not hold the bytecode yet: Python reads what appears there later
        directories = [f.parent for f in files] + [
            Path(d) for d in spec.submodule_search_locations or ()
        ]
        for reason in (
            *(self._check.directory_reason(d) for d in directories),
            *(self._check.file_reason(f) for f in files),
        ):
            if reason is not None:
                raise UntrustedCode(f"{reason} (imported as {name})")


def guard_imports() -> None:
    """From now on, importing a module another user could change raises :class:`UntrustedCode`
    before any of it runs. Root's commands call this once their start-up check passed: a
    command imports most of what it uses (jinja2, systemd's journal bindings) only then."""
    if not any(isinstance(f, _TrustedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TrustedFinder())


def why_symlink_unsafe(directory: Path) -> str | None:
    """Why writing into ``directory`` could be redirected by a symlink, or None.

    The directory itself must not be a symlink; a symlink above it is fine only
    when root owns it and it sits in a directory only root can change.
    """
    absolute = Path(os.path.abspath(directory))
    if absolute.is_symlink():
        return f"{absolute} is a symlink (give the real directory)"
    for part in absolute.parents:
        if not part.is_symlink():
            continue
        reason = _entry_reason(part, os.lstat(part), last=True) or _chain_reason(part.parent)
        if reason is not None:
            return f"{part} is a symlink another user controls: {reason}"
    return None


def _chain_reason(path: Path) -> str | None:
    for part in [*reversed(path.parents), path]:
        try:
            st = os.lstat(part)
        except (FileNotFoundError, NotADirectoryError):
            return None  # what does not exist yet (or lies in a zip), judged as far as it does
        reason = _entry_reason(part, st, last=part == path)
        if reason is not None:
            return reason
    return None


def _entry_reason(part: Path, st: os.stat_result, *, last: bool) -> str | None:
    if st.st_uid not in (0, os.geteuid()):
        return f"{part} is owned by {owner_name(st.st_uid)}"
    if stat.S_ISLNK(st.st_mode):
        return None  # its target is checked through the resolved path
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    # Above a root-owned entry, a sticky directory lets nobody else replace it.
    sticky_parent = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and not last
    if writable and not sticky_parent:
        who = "other users" if st.st_mode & stat.S_IWOTH else "its group"
        return f"{part} is writable by {who}"
    return None


def secret_file_problem(path: Path) -> str | None:
    """Why ``path`` is not fit to hold secrets for systemd (EnvironmentFile=), or None.

    It must exist, be a regular file owned by root (or the caller, for a user's
    manager) with mode 0600 or 0400, in directories only that owner can change.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by {owner_name(st.st_uid)}, not {owner_name(os.geteuid())}"
    if stat.S_IMODE(st.st_mode) not in (0o600, 0o400):
        return f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, not 0600 or 0400"
    return why_untrusted(path)
