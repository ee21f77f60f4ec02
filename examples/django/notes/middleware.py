"""Every response says which worker answered it."""

import os

from clusterkit import cluster

WORKER_ID = cluster.worker.id if cluster.worker is not None else 0


def who_answered(get_response):
    def middleware(request):
        response = get_response(request)
        response["X-Worker"] = str(WORKER_ID)
        response["X-Pid"] = str(os.getpid())
        return response

    return middleware
