"""A worker that fills the one directory under /run its sandbox lets it write (the
crash-loop back-off's, ``$RUNTIME_DIRECTORY``), says how far it got, then serves."""

import os
import sys

LIMIT = 64 * 2**20  # where it stops by itself: /run itself is bigger

path = os.path.join(os.environ["RUNTIME_DIRECTORY"], "filler")
written = 0
try:
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        while written < LIMIT:
            written += f.write(chunk)
except OSError as e:
    print(f"filler: {written} bytes, then {e.strerror}", flush=True)
else:
    print(f"filler: {written} bytes, no error", flush=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shim_worker import serve  # noqa: E402


def answer(conn) -> None:
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")


serve(answer)
