"""The server internals serve_asgi and serve_wsgi adapt exist in the pinned versions.

clusterkit/serve.py says which; pyproject.toml pins the versions. A new
release that moves one of them fails here, before any worker misbehaves.
"""

from __future__ import annotations

import inspect
import socket

import pytest


def test_uvicorn_server_has_the_startup_and_shutdown_serve_asgi_extends() -> None:
    uvicorn = pytest.importorskip("uvicorn")
    for name in ("startup", "shutdown"):
        method = getattr(uvicorn.Server, name)
        assert inspect.iscoroutinefunction(method), name
        assert "sockets" in inspect.signature(method).parameters, name


def test_waitress_has_the_loop_map_and_channel_state_serve_wsgi_reads() -> None:
    pytest.importorskip("waitress")
    from waitress.channel import HTTPChannel
    from waitress.server import create_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        server = create_server(lambda env, start: [], sockets=[sock])
        try:
            assert isinstance(server._map, dict) and server._map
            assert hasattr(server, "channel_class") and hasattr(server, "task_dispatcher")
        finally:
            server.close()
    for attribute in ("requests", "request", "total_outbufs_len"):
        assert attribute in vars(HTTPChannel) or attribute in HTTPChannel.__init__.__code__.co_names
