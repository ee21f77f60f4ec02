"""A worker that will not be stopped: on SIGTERM it keeps asking systemd for more time
(``EXTEND_TIMEOUT_USEC=``, sd_notify(3)), 3 s at a time, every second, for ever."""

import signal
import sys
import time

from clusterkit import cluster, notify

stopping = False


def on_term(signum: int, frame: object) -> None:
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, on_term)
sock = cluster.worker.listen(3000)
cluster.worker.ready()
while not stopping:
    time.sleep(0.1)
print("extend_stop: asking for more time, for ever", flush=True)
while True:
    notify.notify("EXTEND_TIMEOUT_USEC=3000000")
    time.sleep(1)
    sys.stdout.flush()
