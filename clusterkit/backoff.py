"""The crash-loop back-off: a few lines of ``sh`` in front of the worker's command.

systemd 252 has no ``RestartSteps=``, and every command systemd runs in the
worker's sandbox costs a fresh mount namespace (about 0.05 s, ``bench/SANDBOX.md``),
so the back-off is not a command of its own (``ExecStopPost=`` would put one
such set-up between a crash and the restart). It runs at the start of the
worker's own command, in the worker's sandbox and as the worker's user, and
then execs the worker in the same process (so the pid systemd watches, and
its ``NotifyAccess=main``, are the worker's)::

    ExecStart=/bin/sh -c '<started line>; <back-off>; exec "$@"' clusterkit PROGRAM ARG...

The record is ``%t/clusterkit/backoff/%p/%i/starts``: the start time of each run
of this worker since it was last started on purpose. ``RuntimeDirectoryPreserve=restart``
keeps it across systemd's restarts and removes it at a stop; ``ExecStop=`` (run
only when a stop or restart is requested, never after a crash) empties it, so a
``clusterkit reload`` does not count. Every earlier run in the record therefore
ended on its own: a crash, or an exit nobody asked for. Before a start the
script counts those that began within the last 60 s (the latest one always
counts), and waits 0 s after the first or second, then 1 s, 2 s, and 4 s from
the fifth on. An isolated crash costs no wait and no extra process.

Its clock is the start time of its own subshell in ``/proc/self/stat`` (1/100 s
since boot): ``ProcSubset=pid`` hides ``/proc/uptime``. The record is the
worker's own file, so a line that is not a number is skipped: a worker can
only spoil its own pacing, never stop itself from starting. The bookkeeping
runs in a subshell so that no variable of it reaches the worker's environment.

The directory is the only place under ``/run`` the sandbox lets a worker write, and
``/run`` is the file system of systemd's own state: under the system manager the
records of cluster NAME live on a file system of their own, ``MOUNT_SIZE`` small
(``run-private-clusterkit-backoff-NAME.mount``: with ``DynamicUser=yes`` systemd keeps
the directory in its private tree; ``run-clusterkit-backoff-NAME.mount`` for a named
user), so a worker that fills its directory spoils at most its own cluster's pacing.
(A user's manager keeps them in the user's own runtime directory, which logind
already bounds.)
"""

from __future__ import annotations

#: seconds to wait before a start, by the number of earlier runs that ended on their own
WAITS = {0: 0, 1: 0, 2: 0, 3: 1, 4: 2}
LONGEST_WAIT = 4
WINDOW_CS = 6000  # 60 s, in the clock's 1/100 s


#: the unit's ``RuntimeDirectory=`` (%p: the cluster's name, %i: the worker's id)
RUNTIME_DIRECTORY = "clusterkit/backoff/%p/%i"
#: the file system of a cluster's records (a page for each worker's, 1024 workers)
MOUNT_SIZE = "4m"
MOUNT_INODES = 4096
#: its path and the record's, with systemd's specifiers (%t: the runtime root)
RECORD_DIR = f"%t/{RUNTIME_DIRECTORY}"
RECORD = f"{RECORD_DIR}/starts"


def shell_script() -> str:
    """The back-off, as one line of POSIX ``sh`` (a subshell; systemd's ``$`` not yet escaped)."""
    waits = " ".join(f"{n}) d={s};;" for n, s in WAITS.items())
    return (
        f'( [ -d "{RECORD_DIR}" ] || exit 0; r="{RECORD}"; '
        "read -r _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ now _ < /proc/self/stat; "
        "n=0; keep=; last=; "
        'if [ -f "$r" ]; then while read -r t; do '
        'case $t in ""|*[!0-9]*|?????????????*) continue;; esac; last=$t; '
        f'if [ $((now - t)) -lt {WINDOW_CS} ]; then keep="$keep $t"; n=$((n + 1)); fi; '
        'done < "$r"; fi; '
        'if [ -n "$last" ] && [ $n = 0 ]; then keep=$last; n=1; fi; '
        f"case $n in {waits} *) d={LONGEST_WAIT};; esac; "
        "if [ $d != 0 ]; then /bin/sleep $d; fi; "
        'for t in $keep $((now + d * 100)); do echo "$t"; done > "$r" )'
    )


def clear_command() -> str:
    """Shell command for ``ExecStop=``: a requested stop or restart empties the record."""
    return f': > "{RECORD}"'
