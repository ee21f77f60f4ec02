"""A worker that attacks its own crash-loop pacing and ``/run``, says what each try got,
then runs as :mod:`whoami` (which crashes at start while ``/run/ck-crash/ID`` exists).

The back-off's record is ``/run/clusterkit/starts/NAME/ID`` (:mod:`clusterkit.backoff`):
a worker that could empty it would be restarted at once, every time. Each try prints
``tamper: WHAT PATH: RESULT``, RESULT ``done`` or the error.
"""

import os
import sys

from clusterkit import cluster

NAME = os.environ["CLUSTERKIT_NAME"]
ID = cluster.worker.id if cluster.worker is not None else 0
RECORDS = f"/run/clusterkit/starts/{NAME}"


def attempt(what: str, path: str, action) -> None:
    try:
        action()
    except OSError as e:
        result = e.strerror
    else:
        result = "done"
    print(f"tamper: {what} {path}: {result}", flush=True)


def truncate(path: str) -> None:
    with open(path, "w") as f:
        f.write("")


record = f"{RECORDS}/{ID}"
attempt("remove", record, lambda: os.unlink(record))
attempt("empty", record, lambda: truncate(record))
attempt("rename", RECORDS, lambda: os.rename(RECORDS, RECORDS + ".gone"))
for directory in ("/run", "/run/clusterkit", "/run/clusterkit/starts", RECORDS):
    planted = f"{directory}/planted-{ID}"
    attempt("create", planted, lambda planted=planted: truncate(planted))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import whoami  # noqa: E402

whoami.main()
