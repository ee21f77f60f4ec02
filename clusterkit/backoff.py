"""The crash-loop back-off: a unit of its own that systemd runs before every start of a worker.

systemd 252 has no ``RestartSteps=``. Each worker ``NAME@K.service`` wants, and is
ordered after, ``NAME-backoff@K.service`` (no cluster's name ends in ``-backoff``), a oneshot
that runs as root, outside any sandbox (so no mount namespace to set up on the respawn
path), with an environment of its own: none of the worker's ``Environment=`` lines reach
it, so no ``LD_PRELOAD`` the app can write is ever loaded by root. systemd starts it again
for each start of the worker, its own restarts included, and the worker's start waits for
it::

    NAME@K.service:          Wants=NAME-backoff@K.service  After=NAME-backoff@K.service
    NAME-backoff@K.service:  Type=oneshot  ExecStart=/bin/sh -c '<back-off>'

Its record is ``%t/clusterkit/starts/NAME/K`` (%t: ``/run`` under the system manager), in
directories of root's, mode 0700: the worker can neither read nor change it, so a worker
that crashes on purpose cannot reset its own pacing, and it has no place under ``/run``
to fill. The first line is the worker's ``NRestarts`` when the record was written (PID 1
counts the worker's automatic restarts, and only those), the others are the start time
of each run since the worker was last started on purpose: a start that finds
``NRestarts`` unchanged was asked for (``systemctl start``/``restart``, ``clusterkit
reload``) and empties the history. So every earlier run in the record ended on its own:
a crash, or an exit nobody asked for. Before a start the script counts those that began
within the last 60 s (the latest one always counts), and waits 0 s after the first or
second, then 1 s, 2 s, and 4 s from the fifth on. An isolated crash costs no wait.

Under a ``Restart=`` other than ``always`` every start counts: there the shared socket
also starts a worker that ended on its own, and ``NRestarts`` stays unchanged.

It trusts nothing it did not make: ``IFS``, ``PATH`` and the umask are set first, every
program has its full path, and a line of the record that is not a number is skipped. The
record is used only if every directory from ``/run/clusterkit`` down is root's and no
symlink (nor is the record one); else nothing is read or written and every start waits
the longest, 4 s: slow, never unpaced. Its
clock is the start time of its own process in ``/proc/self/stat`` (1/100 s since boot).
Under a user's manager it runs as that user, in the user's runtime directory, beside
workers of the same user.
"""

from __future__ import annotations

#: seconds to wait before a start, by the number of earlier runs that ended on their own
WAITS = {0: 0, 1: 0, 2: 0, 3: 1, 4: 2}
LONGEST_WAIT = 4
WINDOW_CS = 6000  # 60 s, in the clock's 1/100 s

#: the directory of a cluster's records, with systemd's specifier %t (the runtime root)
RECORD_ROOT = "%t/clusterkit/starts"


def shell_script(name: str, user: bool, restart_always: bool = True) -> str:
    """The back-off of cluster *name*'s worker %i, as one line of POSIX ``sh`` (systemd's
    ``$`` not yet escaped; *user*: under a user's manager). *restart_always*: the worker has
    ``Restart=always``, so a start with ``NRestarts`` unchanged was asked for; under another
    policy the socket also starts a worker that ended on its own, and every start counts."""
    waits = " ".join(f"{n}) d={s};;" for n, s in WAITS.items())
    systemctl = "/bin/systemctl --user" if user else "/bin/systemctl"
    asked_for = (
        # NRestarts unchanged: PID 1 did not restart the worker, someone started it; and
        # PID 1 sets NRestarts to 0 as that start begins, so that is what the next one sees
        'if [ "$restarts" != unknown ] && [ "$seen" = "n=$restarts" ]; then '
        "keep=; last=; n=0; restarts=0; fi; "
        if restart_always
        else ""
    )
    return (
        'IFS=" "; PATH=/usr/bin:/bin; umask 077; '
        f'base="{RECORD_ROOT.rsplit("/", 1)[0]}"; top="{RECORD_ROOT}"; dir="$top/{name}"; '
        'r="./%i"; /bin/mkdir -p "$dir"; '
        # every directory on the way root's (no other user can then rename or replace what
        # is in it) and no symlink, else no record can be trusted: the longest wait
        'for d in "$base" "$top" "$dir" "$dir/%i"; do '
        'if [ -h "$d" ] || { [ "$d" != "$dir/%i" ] && { [ ! -d "$d" ] || [ ! -O "$d" ]; }; }; '
        f'then echo "$d is a symlink or a directory of another user: waiting {LONGEST_WAIT}s"; '
        f"/bin/sleep {LONGEST_WAIT}; exit 0; fi; done; "
        'cd "$dir" || exit 0; '
        "read -r _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ now _ < /proc/self/stat; "
        f'restarts=$({systemctl} show -P NRestarts "{name}@%i.service"); '
        'case $restarts in ""|*[!0-9]*|??????????*) restarts=unknown;; esac; '
        "n=0; keep=; last=; seen=; "
        'if [ -f "$r" ]; then { read -r seen; while read -r t; do '
        'case $t in ""|*[!0-9]*|?????????????*) continue;; esac; last=$t; '
        f'if [ $((now - t)) -lt {WINDOW_CS} ]; then keep="$keep $t"; n=$((n + 1)); fi; '
        'done; } < "$r"; fi; '
        f"{asked_for}"
        'if [ -n "$last" ] && [ $n = 0 ]; then keep=$last; n=1; fi; '
        f"case $n in {waits} *) d={LONGEST_WAIT};; esac; "
        'if [ $d != 0 ]; then echo "$n runs ended on their own within 60s: waiting ${d}s"; '
        "/bin/sleep $d; fi; "
        '{ echo "n=$restarts"; for t in $keep $((now + d * 100)); do echo "$t"; done; } > "$r"'
    )
