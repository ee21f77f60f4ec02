"""``clusterkit up``: render a cluster's units and run them on real systemd, in the foreground.

Where systemd is PID 1, the units are installed as runtime units
(``/run/systemd/system``, gone at reboot) and started. Where it is not (a
container, a CI machine), a throwaway systemd container is booted with the
host's network, so the port is reachable from the host exactly as it would be
on a server. Either way: progress while starting, the workers that serve, then
the cluster's events as they happen; Ctrl-C (or SIGTERM) stops the workers
and removes everything ``up`` set up.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from clusterkit import manifest, names, render, terminal
from clusterkit.manager import Manager, ManagerError, register_up, unregister_up, up_manager
from clusterkit.spec import Listen, Spec

START_TIMEOUT = 60.0
PROBE_SECONDS = 10  # for the app's whole answer to GET /
PROBE_BYTES = 4096  # of its body: enough to show its start
#: where a probe of a wildcard address goes
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
NOTIFY_HINT_AFTER = 5.0  # seconds without READY=1 before up suggests --type exec
Say = Callable[[str], None]


def bundled_example() -> Path | None:
    """examples/hello of the checkout this package runs from (absent in a wheel install)."""
    example = Path(__file__).resolve().parent.parent / "examples" / "hello"
    return example if (example / "cluster.py").is_file() else None


def write_units(spec: Spec, directory: Path) -> list[Path]:
    """Render ``spec`` into ``directory``; the units and generator (not the manifest)."""
    result = render.write(spec, directory)
    names = (*result.written, *result.unchanged)
    return [directory / n for n in names if not n.endswith(manifest.SUFFIX)]


def loopback_only(spec: Spec) -> tuple[Spec, list[str]]:
    """``spec`` with every bare port bound to 127.0.0.1, and a note for each one changed.

    ``up`` is for trying an app out: it must not expose it to the network unless
    ``--listen`` names an address explicitly.
    """
    listens, notes = [], []
    for listen in spec.listen:
        if listen.is_unix or ":" in listen.address:
            listens.append(listen)
            continue
        listens.append(Listen(f"127.0.0.1:{listen.port}", listen.port))
        notes.append(
            f"      --listen {listen.address} means 127.0.0.1:{listen.port} under up "
            f"(loopback only; give an address, e.g. 0.0.0.0:{listen.port}, to listen elsewhere)"
        )
    return dataclasses.replace(spec, listen=tuple(listens)), notes


def app_binds(spec: Spec) -> list[str]:
    """Directories of the app (outside /usr and the checkout) to bind read-only into a container."""
    from clusterkit.container import checkout_root

    candidates = [spec.working_directory, *(a for a in spec.exec if a.startswith("/"))]
    root = checkout_root()
    binds: list[str] = []
    for candidate in filter(None, candidates):
        path = Path(candidate)
        directory = path if path.is_dir() else path.parent
        if not directory.is_dir() or directory == Path("/"):
            continue
        if any(directory.is_relative_to(p) for p in ("/usr", "/proc", "/sys", "/dev", "/run")):
            continue
        if (root is not None and directory.is_relative_to(root)) or str(directory) in binds:
            continue
        binds.append(str(directory))
    return binds


HOST_UNIT_DIR = Path("/etc/systemd/system")


def host_dropins(name: str) -> dict[str, str]:
    """The operator's drop-ins for this cluster's units on the host (root's only).

    Under `up`, `systemctl edit` has no systemd to talk to; a drop-in written
    by hand where it would go on a server (``/etc/systemd/system/NAME@.service.d/``)
    is copied into the container, so it works as on a real host.
    """
    from clusterkit import trust

    found: dict[str, str] = {}
    for unit in names.files(name):
        directory = HOST_UNIT_DIR / f"{unit}.d"
        if not directory.is_dir() or (trust.as_root() and trust.why_untrusted(directory)):
            continue
        for conf in sorted(directory.glob("*.conf")):
            if not trust.as_root() or trust.why_untrusted(conf) is None:
                found[f"{unit}.d/{conf.name}"] = conf.read_text(encoding="utf-8")
    return found


def _invisible_program(spec: Spec, binds: list[str]) -> str | None:
    """Why the container would not find the program, or None (it sees /usr, the checkout, binds)."""
    from clusterkit.container import checkout_root

    real = Path(os.path.realpath(spec.exec[0]))
    visible = [Path("/usr"), *map(Path, binds)]
    root = checkout_root()
    if root is not None:
        visible.append(root)
    # A Python outside /usr needs its standard library from there too, which is not bound.
    interpreter = real.name.startswith("python")
    if any(real.is_relative_to(v) for v in visible) and not (
        interpreter and not real.is_relative_to("/usr")
    ):
        return None
    return (
        f"{spec.exec[0]} runs {real}, outside /usr and the app's directories, which the "
        "throwaway container cannot see (a Python from pyenv or /opt?): make the app's venv "
        "with /usr/bin/python3 -m venv"
    )


def _follower_argv(spec: Spec) -> list[str]:
    # -I: the follower never imports from its working directory or PYTHON* variables.
    return [sys.executable, "-I", "-m", "clusterkit.cli", "events", spec.name, "--follow", "--logs"]


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    # Ctrl-C and `kill PID` must both end in the same clean-up.
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unusable_address(spec: Spec) -> str | None:
    """Why the first TCP address of ``spec`` cannot be listened on here, or None."""
    for listen in spec.listen:
        if listen.is_unix:
            continue
        host = listen.host or "::"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                probe.bind((host, listen.port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return f"{listen.address}: already in use on this machine"
                return f"{listen.address}: cannot listen there ({e.strerror})"
    return None


def up(spec: Spec, say: Say = print, binds: tuple[str, ...] = ()) -> int:
    """Run ``spec`` until interrupted; 0 after a clean stop, 1 if it never started.

    ``binds``: more directories the container should see, read-only.
    """
    spec, notes = loopback_only(spec)
    for note in notes:
        say(note)
    if up_manager(spec.name) is not None:
        say(
            f"clusterkit up: a cluster named {spec.name} already runs under up in another "
            "shell; stop it (Ctrl-C there) or choose another --name"
        )
        return 1
    busy = _unusable_address(spec)
    if busy:
        say(f"clusterkit up: --listen {busy}; free it, or choose another with --listen")
        return 1
    with _sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="clusterkit-up-") as tmp:
        files = write_units(spec, Path(tmp))
        say(f"[1/4] rendered {len(files)} files for {spec.name} into {tmp}")
        if Path("/run/systemd/system").is_dir():
            return _up_on_host(spec, files, say)
        return _up_in_container(spec, files, say, binds)


def _up_in_container(spec: Spec, files: list[Path], say: Say, extra: tuple[str, ...]) -> int:
    from clusterkit.container import Container, ContainerError, prerequisites_missing, stop_process

    missing = prerequisites_missing()
    if missing:
        say(f"clusterkit up: systemd is not PID 1 here and no container can boot: {missing}")
        return 1
    binds = app_binds(spec) + [b for b in extra if b not in app_binds(spec)]
    separated = next((b for b in binds if ":" in b), None)
    if separated is not None:  # nspawn's --bind-ro=SRC[:DST[:OPTIONS]]
        say(
            f"clusterkit up: {separated} has a ':' in its path, which systemd-nspawn would read "
            "as where to bind it; move the app to a path without one"
        )
        return 1
    unseen = _invisible_program(spec, binds)
    if unseen:
        say(f"clusterkit up: --exec: {unseen}")
        return 1
    say(
        "[2/4] systemd is not PID 1 here: booting a throwaway systemd container "
        f"(host network; checkout{' and ' + ', '.join(binds) if binds else ''} read-only)"
    )
    started = time.monotonic()
    box = Container(private_network=False, checkout_read_only=True, binds_ro=binds)
    try:
        box.start()
        say(f"      container {box.name} is up ({time.monotonic() - started:.1f}s)")
        generators = [f for f in files if f.name.startswith(render.GENERATOR_PREFIX)]
        for generator in generators:
            box.write_file(
                f"/run/systemd/system-generators/{generator.name}", generator.read_text(), 0o755
            )
        dropins = host_dropins(spec.name)
        for path, text in dropins.items():
            box.write_file(f"/run/systemd/system/{path}", text)
        if dropins:
            say(f"      with {len(dropins)} drop-in(s) from {HOST_UNIT_DIR}: {', '.join(dropins)}")
        box.install_units([f for f in files if f not in generators])
        manager = Manager(container_pid=box.pid)
        register_up(spec.name, box.pid)  # other shells find the cluster by its name
        if not _start(spec, manager, say):
            return 1
        follower = box.popen(*_follower_argv(spec))
        return _serve_until_interrupted(
            spec, follower, say, lambda: (stop_process(follower), _stop(spec, manager, say))
        )
    except ContainerError as e:
        say(f"clusterkit up: {str(e).splitlines()[0]}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        unregister_up(spec.name)
        say("      powering off the container")
        box.poweroff()


def _up_on_host(spec: Spec, files: list[Path], say: Say) -> int:
    from clusterkit.install import InstallError, install, uninstall

    manager = Manager(runtime=True)
    say(f"[2/4] systemd is PID 1: installing runtime units into {manager.unit_dir}")
    try:
        install(files[0].parent, spec.name, manager)
    except InstallError as e:
        say(f"clusterkit up: {e}")
        return 1
    try:
        if not _start(spec, manager, say):
            return 1
        follower = subprocess.Popen(
            _follower_argv(spec), stdout=subprocess.PIPE, text=True, cwd="/"
        )
        return _serve_until_interrupted(
            spec, follower, say, lambda: (_end(follower), _stop(spec, manager, say))
        )
    except KeyboardInterrupt:
        return 0
    finally:
        say(f"      removing {spec.name}'s runtime units")
        uninstall(spec.name, manager)


def _workers(spec: Spec, manager: Manager) -> list[str]:
    """The workers NAME.target wants, in id order."""
    wants = manager.show([names.target(spec.name)], ("Wants",))[0]["Wants"].split()
    ids = sorted(k for w in wants if (k := names.worker_id(w, spec.name)) is not None)
    return [names.service(spec.name, k) for k in ids]


def _start(spec: Spec, manager: Manager, say: Say) -> bool:
    units = _workers(spec, manager)
    say(f"[3/4] starting {spec.name}.target: {len(units)} workers")
    try:
        manager.systemctl("start", "--no-block", names.target(spec.name))
    except ManagerError as e:
        say(f"clusterkit up: {e}")
        return False
    deadline = time.monotonic() + START_TIMEOUT
    pending = list(units)
    hint_at = time.monotonic() + NOTIFY_HINT_AFTER if spec.type == "notify" else None
    while pending and time.monotonic() < deadline:
        if hint_at is not None and time.monotonic() > hint_at:
            hint_at = None
            say(
                f"      still waiting for READY=1 from {', '.join(pending)}: a server that "
                "never sends it (stock uvicorn, most others) needs --type exec"
            )
        for unit in list(pending):
            props = manager.show([unit], ("ActiveState", "MainPID", "NRestarts"))[0]
            if props["ActiveState"] == "active":
                worker = names.worker_id(unit, spec.name)
                say(f"      worker {worker} (pid {props['MainPID']}) is ready")
                pending.remove(unit)
            elif props["ActiveState"] == "failed" or int(props["NRestarts"] or 0) >= 2:
                # systemd keeps restarting a crashing worker: show why now, since a
                # throwaway container's journal is gone once it powers off.
                say(f"clusterkit up: {unit} keeps failing; its last journal lines:")
                log = manager.run("journalctl", "--no-pager", "-o", "cat", "-n", "15", "-u", unit)
                if log.stdout.strip():  # the app's text: shown, never obeyed; under the bar
                    say("      | " + terminal.lines(log.stdout, continuation="      | "))
                return False
        time.sleep(0.1)
    if pending:
        say(f"clusterkit up: {', '.join(pending)} not ready after {START_TIMEOUT:g}s")
        return False
    return True


def _probe_host(listen: Listen) -> str:
    """The address a probe of *listen* connects to: loopback for a wildcard."""
    return _LOOPBACK.get(listen.host, listen.host)


def _probe(host: str, port: int) -> str:
    """What GET / answers: any status is an answer (an app may have no "/" route).

    The app is not trusted: at most PROBE_BYTES of its body are read, and the whole
    answer gets PROBE_SECONDS, after which the socket is shut down (an app could
    otherwise drip its answer a byte at a time and keep ``up`` from its events).
    """
    connection = http.client.HTTPConnection(host, port, timeout=PROBE_SECONDS)
    timed_out = threading.Event()

    def cut_off() -> None:
        timed_out.set()
        if connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

    cut = threading.Timer(PROBE_SECONDS, cut_off)
    try:
        connection.connect()
        cut.start()
        connection.request("GET", "/")
        response = connection.getresponse()
        try:
            body = response.read(PROBE_BYTES)
        except http.client.IncompleteRead as e:  # cut off, or the app hung up early
            body = e.partial
        text = body.decode(errors="replace").strip()[:60]
        shown = [str(response.status), terminal.escaped(response.reason), repr(text)]
        if timed_out.is_set():
            shown.append(f"(cut off after {PROBE_SECONDS} s)")
        return " ".join(filter(None, shown))
    except (OSError, http.client.HTTPException) as e:
        why = f"no answer within {PROBE_SECONDS} s" if timed_out.is_set() else str(e)
        return f"nothing usable ({terminal.escaped(why)}); the workers are ready, check the app"
    finally:
        cut.cancel()
        connection.close()


def _serve_until_interrupted(
    spec: Spec, follower: subprocess.Popen[str], say: Say, stop: Callable[[], None]
) -> int:
    try:
        listen = next((listen for listen in spec.listen if not listen.is_unix), None)
        if listen is not None and listen.port is not None:
            host = _probe_host(listen)
            url = f"http://{f'[{host}]' if ':' in host else host}:{listen.port}/"
            say(f"[4/4] serving: {url} answered {_probe(host, listen.port)}")
        else:
            say("[4/4] serving")
        say("      events follow; Ctrl-C stops everything")
        assert follower.stdout is not None
        for line in follower.stdout:
            say(f"      {line.rstrip()}")
        return 0
    except KeyboardInterrupt:
        say("\n      Ctrl-C: stopping")
        return 0
    finally:
        stop()


def _end(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()


def _stop(spec: Spec, manager: Manager, say: Say) -> None:
    from clusterkit import primary

    primary.stop(settings=primary.Settings(spec.name, manager, spec))
    say(f"      stopped {spec.name}")
