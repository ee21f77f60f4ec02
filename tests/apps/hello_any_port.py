"""Hello world on whichever single socket systemd passed (the tests choose the port)."""

from clusterkit.serve import serve_asyncio

serve_asyncio(lambda request: "hello world\n", None)
