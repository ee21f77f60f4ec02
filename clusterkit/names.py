"""Names and the worker's environment: the contract between the units and the code.

A cluster ``NAME`` is these units (systemd.unit(5) names):

- ``NAME@.service``, instances ``NAME@K.service``: the workers, K = 0, 1, …;
- ``NAME.socket`` (scheduling ``shared``: one socket for every worker) or
  ``NAME@.socket``, instances ``NAME@K.socket`` (``reuseport``: one each);
- ``NAME.target``: wants the workers; ``clusterkit-NAME``: the generator that
  counts them at boot when the worker count is ``auto``;
- ``NAME-backoff@.service``, instances ``NAME-backoff@K.service``: the crash-loop
  back-off run before every start of worker K (:mod:`clusterkit.backoff`); no cluster
  name ends in ``-backoff``, so no cluster's units are another's;
- ``run-private-clusterkit-backoff-NAME.mount`` and ``run-clusterkit-backoff-NAME.mount``:
  written by earlier versions (a file system for back-off records the workers wrote),
  removed as stale when the cluster is installed again or uninstalled.

Every worker gets ``CLUSTERKIT_NAME``, ``CLUSTERKIT_WORKER_ID`` (K),
``CLUSTERKIT_SCHEDULING`` and ``CLUSTERKIT_DRAIN_TIMEOUT`` (seconds) in its
environment, and its listening sockets named :data:`FD_NAME` (``LISTEN_FDNAMES``).
Stdlib only: every worker imports this.
"""

from __future__ import annotations

SHARED = "shared"  # one socket, every worker accepts on it (Node's SCHED_NONE)
REUSEPORT = "reuseport"  # one SO_REUSEPORT socket per worker; the kernel spreads connections
SCHEDULING_MODES = (SHARED, REUSEPORT)

FD_NAME = "http"  # FileDescriptorName= of every listening socket

ENV_NAME = "CLUSTERKIT_NAME"
ENV_WORKER_ID = "CLUSTERKIT_WORKER_ID"
ENV_SCHEDULING = "CLUSTERKIT_SCHEDULING"
ENV_DRAIN_TIMEOUT = "CLUSTERKIT_DRAIN_TIMEOUT"
ENV_PREFIX = "CLUSTERKIT_"  # reserved: a user's --env may not set these

GENERATOR_PREFIX = "clusterkit-"


def service(name: str, worker: int | None = None) -> str:
    """``NAME@K.service``, or the template ``NAME@.service`` without ``worker``."""
    return f"{name}@{'' if worker is None else worker}.service"


def socket(name: str, scheduling: str, worker: int | None = None) -> str:
    """The socket unit a worker gets its listening socket from."""
    if scheduling == SHARED:
        return f"{name}.socket"
    return f"{name}@{'' if worker is None else worker}.socket"


def target(name: str) -> str:
    return f"{name}.target"


def generator(name: str) -> str:
    return f"{GENERATOR_PREFIX}{name}"


#: what a back-off unit's name adds to its cluster's; no cluster name may end in it
BACK_OFF_SUFFIX = "-backoff"


def back_off(name: str, worker: int | str | None = None) -> str:
    """``NAME-backoff@K.service``, or the template ``NAME-backoff@.service``."""
    return f"{name}{BACK_OFF_SUFFIX}@{'' if worker is None else worker}.service"


#: where earlier versions mounted the back-off records of cluster NAME (the workers'
#: RuntimeDirectory=): a throwaway user's (DynamicUser=yes) in systemd's private tree; a
#: named user's in /run. Only for removing those mount units now.
BACK_OFF_ROOTS = {True: "/run/private/clusterkit/backoff", False: "/run/clusterkit/backoff"}


def back_off_mount(name: str, dynamic_user: bool) -> str:
    """The mount unit of ``BACK_OFF_ROOTS[dynamic_user]/NAME`` (systemd-escape --path;
    a name has letters, digits, '_', '.' and '-', of which only '-' is escaped)."""
    path = f"{BACK_OFF_ROOTS[dynamic_user]}/{name}".strip("/")
    return path.replace("-", "\\x2d").replace("/", "-") + ".mount"


def files(name: str) -> tuple[str, ...]:
    """Every file a cluster ``name`` can have, in either scheduling mode."""
    return (
        socket(name, SHARED),
        socket(name, REUSEPORT),
        service(name),
        target(name),
        generator(name),
        back_off(name),
        back_off_mount(name, dynamic_user=True),
        back_off_mount(name, dynamic_user=False),
    )


def worker_id(unit: object, name: str) -> int | None:
    """K of ``NAME@K.service``; None for any other unit."""
    prefix, suffix = f"{name}@", ".service"
    if not isinstance(unit, str) or not (unit.startswith(prefix) and unit.endswith(suffix)):
        return None
    text = unit[len(prefix) : -len(suffix)]
    return int(text) if text.isascii() and text.isdigit() else None
