"""The server internals serve_asgi and serve_wsgi adapt exist in the pinned versions.

clusterkit/serve.py says which; pyproject.toml pins the versions. A new
release that moves one of them fails here, before any worker misbehaves.
"""

from __future__ import annotations

import inspect
import socket
import subprocess
import sys

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
            assert isinstance(server.adj.connection_limit, int)  # where it stops accepting
            assert isinstance(server.adj.outbuf_high_watermark, int)  # where app writes wait
        finally:
            server.close()
    for attribute in ("requests", "request", "total_outbufs_len", "will_close", "last_activity"):
        assert attribute in vars(HTTPChannel) or attribute in HTTPChannel.__init__.__code__.co_names
    assert callable(HTTPChannel.handle_close)  # drop_stalled_senders closes a channel with it


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_serve_asgi_imports_uvicorn_without_its_command_line_yet_the_package_stays_whole() -> None:
    pytest.importorskip("uvicorn")
    # a fresh interpreter: this one may have imported uvicorn already
    done = _python(
        "import sys\n"
        "from clusterkit.uvicornimport import config_and_server\n"
        "Config, Server = config_and_server()\n"
        "assert 'click' not in sys.modules and 'uvicorn.main' not in sys.modules\n"
        "import uvicorn\n"
        "assert uvicorn.Config is Config and uvicorn.Server is Server\n"
        "from uvicorn.lifespan.on import LifespanOn\n"  # imports `Config` from the package
        "assert 'uvicorn.main' not in sys.modules\n"
        "from uvicorn import main, run\n"  # a name only __init__ defines: it runs now
        "assert run is sys.modules['uvicorn.main'].run and uvicorn.__version__\n"
        "assert uvicorn.Server is Server and config_and_server() == (Config, Server)\n"
        "try:\n"
        "    uvicorn.no_such_name\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_config_and_server_returns_uvicorns_own_when_uvicorn_was_imported_first() -> None:
    pytest.importorskip("uvicorn")
    done = _python(
        "import uvicorn\n"
        "from clusterkit.uvicornimport import config_and_server\n"
        "assert config_and_server() == (uvicorn.Config, uvicorn.Server)\n"
        "print('ok')\n"
    )
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
