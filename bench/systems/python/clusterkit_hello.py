"""clusterkit's worker for the benchmark: the hello world on clusterkit's fastest serving path.

systemd starts one per NAME@K.service with the listening socket passed in; serve_asyncio
(uvloop + httptools) answers every request with the same 12-byte body as the other systems.
"""

from clusterkit.serve import serve_asyncio

serve_asyncio(lambda request: b"hello world\n", 3000)
