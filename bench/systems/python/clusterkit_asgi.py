"""clusterkit's ASGI worker for the benchmark: the app uvicorn --workers serves, under serve_asgi.

The same uvicorn protocol on every ASGI side of the comparison: httptools (serve_asgi defaults
to h11; the benchmark passes http="httptools" here, and `uvicorn --http httptools` and
gunicorn's UvicornWorker use httptools too), no access log.
"""

from app import asgi

from clusterkit.serve import serve_asgi

serve_asgi(asgi, 3000, http="httptools", access_log=False, log_level="warning")
