"""``python -m clusterkit.report``: one journal record per worker exit.

The service template runs this as ``ExecStopPost=+…`` after every run of a
worker, however it ended. ``+`` runs it as root outside the sandbox but in the
worker's cgroup, so its records carry ``_UID=0`` and
``_SYSTEMD_UNIT=NAME@K.service``, which a sandboxed worker cannot forge (see
:mod:`clusterkit.events`). systemd's own "Main process exited" record is not
written for a clean exit 0, hence this record.

What it reads (systemd.exec(5), systemd.service(5), checked on systemd 252):

- ``$SERVICE_RESULT``, ``$EXIT_CODE`` (exited/killed/dumped), ``$EXIT_STATUS``
  (a number, or a signal name such as ``KILL``), ``$INVOCATION_ID`` and the
  ``CLUSTERKIT_*`` variables of the unit;
- the dead main pid, which no variable carries: ``systemctl show -p
  ExecMainPID`` still holds it while ``ExecStopPost=`` runs;
- whether the stop was requested (Node's ``exitedAfterDisconnect``): a
  ``stop`` or ``restart`` job for the unit is running while ``ExecStopPost=``
  runs (``systemctl show -p Job``, then ``systemctl list-jobs UNIT`` for its
  type); a crash, a ``systemctl kill``, a watchdog or OOM kill has no job.

Under a user's manager (``$MANAGERPID`` is set, systemd.exec(5)) it asks
``systemctl --user``. It must never fail the unit: anything missing is logged
in the record (``CLUSTERKIT_REPORT_ERROR``) and the exit status is always 0.
Only ``os``, ``subprocess`` and systemd-python's C sender are imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

#: MESSAGE_ID of an exit record (``journalctl MESSAGE_ID=…``).
EXIT_MESSAGE_ID = "ce590ac18e984f6bade34ce6da8cc60e"

#: Job types meaning "someone asked this worker to stop" (systemctl list-jobs).
_STOP_JOBS = ("stop", "restart", "try-restart", "reload-or-start")

_CODE_NAMES = {"1": "exited", "2": "killed", "3": "dumped"}  # ExecMainCode= (CLD_*)


def _systemctl(user: bool, *args: str) -> str:
    argv = ["systemctl", *(["--user"] if user else []), "--no-pager", *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {(r.stderr or r.stdout).strip() or r.returncode}")
    return r.stdout


def _show(user: bool, unit: str) -> dict[str, str]:
    props = "ExecMainPID,ExecMainCode,ExecMainStatus,Job,NRestarts"
    out = _systemctl(user, "show", "-p", props, unit)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _job_type(user: bool, unit: str) -> str | None:
    # "267 t@1.service stop running"
    for line in _systemctl(user, "list-jobs", "--no-legend", unit).splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit:
            return fields[2]
    return None


def signal_name(status: str) -> str:
    """``KILL`` or ``9`` -> ``SIGKILL`` (Node's signal names)."""
    if status.isdigit():
        import signal

        try:
            return signal.Signals(int(status)).name
        except ValueError:
            return f"SIG{status}"
    return status if status.startswith("SIG") else f"SIG{status}"


def collect(env: dict[str, str]) -> dict[str, str]:
    """The record's fields, from the environment and systemd's view of the unit."""
    name = env.get("CLUSTERKIT_NAME", "")
    worker_id = env.get("CLUSTERKIT_WORKER_ID", "")
    unit = f"{name}@{worker_id}.service"
    user = bool(env.get("MANAGERPID")) or os.getuid() != 0
    errors: list[str] = []
    if not name or not worker_id:
        errors.append("CLUSTERKIT_NAME or CLUSTERKIT_WORKER_ID missing from the environment")

    kind, status = env.get("EXIT_CODE", ""), env.get("EXIT_STATUS", "")
    show: dict[str, str] = {}
    job: str | None = None
    try:
        show = _show(user, unit)
        if show.get("Job"):
            job = _job_type(user, unit) or "unknown"
    except (OSError, subprocess.SubprocessError) as e:
        errors.append(str(e))
    if not kind and show.get("ExecMainCode") in _CODE_NAMES:
        kind, status = _CODE_NAMES[show["ExecMainCode"]], show.get("ExecMainStatus", "")

    fields = {
        "CLUSTERKIT_NAME": name,
        "CLUSTERKIT_WORKER_ID": worker_id,
        "CLUSTERKIT_UNIT": unit,
        "CLUSTERKIT_INVOCATION_ID": env.get("INVOCATION_ID", ""),
        "CLUSTERKIT_PID": show.get("ExecMainPID", "") if show.get("ExecMainPID") != "0" else "",
        "CLUSTERKIT_EXIT_KIND": kind,
        "CLUSTERKIT_SERVICE_RESULT": env.get("SERVICE_RESULT", ""),
        "CLUSTERKIT_STOP_REQUESTED": "1" if job in _STOP_JOBS else "0",
        "CLUSTERKIT_STOP_JOB": job or "",
        "CLUSTERKIT_RESTARTS": show.get("NRestarts", ""),
    }
    if kind == "exited" and status.lstrip("-").isdigit():
        fields["CLUSTERKIT_EXIT_CODE"] = status
    elif kind in ("killed", "dumped") and status:
        fields["CLUSTERKIT_SIGNAL"] = signal_name(status)
    else:
        errors.append(f"no exit status (EXIT_CODE={kind!r}, EXIT_STATUS={status!r})")
    if errors:
        fields["CLUSTERKIT_REPORT_ERROR"] = "; ".join(errors)
    return {k: v for k, v in fields.items() if v}


def message(fields: dict[str, str]) -> str:
    """Node-like text: ``worker 2 (pid 1234) died: signal SIGKILL``."""
    how = (
        f"signal {fields['CLUSTERKIT_SIGNAL']}"
        if "CLUSTERKIT_SIGNAL" in fields
        else f"code {fields.get('CLUSTERKIT_EXIT_CODE', 'unknown')}"
    )
    verb = "exited after disconnect" if fields["CLUSTERKIT_STOP_REQUESTED"] == "1" else "died"
    worker = fields.get("CLUSTERKIT_WORKER_ID", "?")
    return f"worker {worker} (pid {fields.get('CLUSTERKIT_PID', '?')}) {verb}: {how}"


def send(fields: dict[str, str]) -> None:
    """Write one record through the journal's native protocol."""
    try:
        from systemd._journal import sendv  # the C sender alone: ~1 ms to import
    except ImportError:
        from systemd.journal import sendv
    crashed = fields["CLUSTERKIT_STOP_REQUESTED"] == "0" or fields.get("CLUSTERKIT_SIGNAL")
    sendv(
        f"MESSAGE={message(fields)}",
        f"MESSAGE_ID={EXIT_MESSAGE_ID}",
        f"PRIORITY={4 if crashed else 6}",
        "SYSLOG_IDENTIFIER=clusterkit",
        *(f"{k}={v}" for k, v in fields.items()),
    )


def main() -> int:
    try:
        send(collect(dict(os.environ)))
    except Exception as e:  # never fail the unit; stderr goes to the journal too
        print(f"clusterkit.report: could not record the exit: {e!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
