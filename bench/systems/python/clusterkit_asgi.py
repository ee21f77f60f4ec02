"""clusterkit's ASGI worker for the benchmark: the app uvicorn --workers serves, under serve_asgi.

The same uvicorn protocol on every ASGI side of the comparison: httptools (serve_asgi's default
where it is installed, named here as `uvicorn --http httptools` names it; gunicorn's
UvicornWorker uses it too), no access log. serve_asgi adds clusterkit's limits to it
(clusterkit.asgiprotocols), which the other sides lack.
"""

from app import asgi

from clusterkit.serve import serve_asgi

serve_asgi(asgi, 3000, http="httptools", access_log=False, log_level="warning")
