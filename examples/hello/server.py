"""Node's server.js: a hello-world HTTP server on port 3000.

Run directly (``python server.py``) it binds port 3000 itself, like
``node server.js``; started by systemd it serves on the socket systemd passed.
"""

from clusterkit.serve import serve_asyncio


def start_server() -> None:
    serve_asyncio(lambda request: "hello world\n", 3000)


if __name__ == "__main__":
    start_server()
