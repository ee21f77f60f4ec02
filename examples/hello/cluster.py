"""Node's cluster.js, with systemd as the primary.

As a primary (run by you) it forks one worker per CPU, i.e. starts
hello@0.service ... hello@N-1.service, and logs each worker's death; as a
worker (run by systemd from hello@.service) it serves.
"""

import os

from clusterkit import cluster

if cluster.is_primary:
    for _ in range(os.cpu_count()):
        cluster.fork()

    cluster.on("exit", lambda worker, code, signal: print(f"worker {worker.process.pid} died"))
    cluster.run()  # Node's event loop: follow the journal until Ctrl-C
else:
    from server import start_server

    start_server()
