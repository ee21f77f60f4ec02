"""A worker that will not be stopped: on SIGTERM it keeps asking systemd for more time
(``EXTEND_TIMEOUT_USEC=``, sd_notify(3)), 3 s at a time, every second, for ever. Worker 1
does the same from its start, so it never becomes ready nor times out."""

import os
import signal
import time

from clusterkit import cluster, notify

stopping = False


def on_term(signum: int, frame: object) -> None:
    global stopping
    stopping = True


def extend_for_ever(what: str) -> None:
    print(f"extend_stop: delaying my {what}, for ever", flush=True)
    while True:
        notify.notify("EXTEND_TIMEOUT_USEC=3000000")
        time.sleep(1)


signal.signal(signal.SIGTERM, on_term)
sock = cluster.worker.listen(3000)
if os.environ.get("CLUSTERKIT_WORKER_ID") == "1":
    extend_for_ever("start")
cluster.worker.ready()
while not stopping:
    time.sleep(0.1)
extend_for_ever("stop")
