"""Scenario test primary: prints every ``exit`` event of a cluster as a JSON line.

    python primary.py NAME SINCE_EPOCH TIMEOUT [--disconnect ID] [--exits N]

Node-style: ``cluster.on("exit", ...)`` then ``cluster.run()``, replaying the
journal from SINCE (so nothing that happened after the caller noted that time
is missed). ``--disconnect ID`` first calls ``cluster.workers[ID].disconnect()``
and prints ``{"disconnected": ID, "exited_after_disconnect": ...}``. Stops after
``--exits N`` exit events, or after TIMEOUT seconds.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from clusterkit import cluster


def main() -> None:
    """Parse the arguments, optionally disconnect a worker, then report exits."""
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("since", type=float)
    p.add_argument("timeout", type=float)
    p.add_argument("--disconnect", type=int)
    p.add_argument("--exits", type=int)
    args = p.parse_args()

    cluster.setup_primary(name=args.name)
    seen: list[dict[str, object]] = []

    def on_exit(worker, code, signal) -> None:  # noqa: ANN001 - Node's callback shape
        event = {
            "worker": worker.id,
            "pid": worker.process.pid,
            "code": code,
            "signal": signal,
            "exited_after_disconnect": worker.exited_after_disconnect,
        }
        seen.append(event)
        print(json.dumps(event), flush=True)

    cluster.on("exit", on_exit)
    if args.disconnect is not None:
        w = cluster.workers[args.disconnect]
        w.disconnect()
        print(
            json.dumps(
                {"disconnected": w.id, "exited_after_disconnect": w.exited_after_disconnect}
            ),
            flush=True,
        )
    stop = (lambda: len(seen) >= args.exits) if args.exits else None
    cluster.run(since=datetime.fromtimestamp(args.since, UTC), timeout=args.timeout, stop=stop)


if __name__ == "__main__":
    main()
