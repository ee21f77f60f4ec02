"""clusterkit's WSGI worker for the benchmark: the app gunicorn -w N serves, under serve_wsgi
(waitress, in this process)."""

from app import wsgi

from clusterkit.serve import serve_wsgi

serve_wsgi(wsgi, 3000)
