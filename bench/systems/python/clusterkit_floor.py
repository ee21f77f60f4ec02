"""The floor under serve_asyncio, for the benchmark: the least a Python server on uvloop and
httptools can do per request, run by the same units as clusterkit_hello.py.

The protocol feeds llhttp and, when a request ends, writes a fixed response (serve_asyncio's
bytes for the hello world, its Date fixed), closing if the client asked. No limits, no
timeouts, no Request, no handler: not a server anyone should deploy, but the throughput no
Python server can pass on the same machine, event loop and parser. serve_asyncio serves it
as a raw protocol (connections tracked for the drain, nothing per request).
"""

import asyncio

import httptools

from clusterkit.serve import serve_asyncio

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 12\r\n"
    b"Date: Mon, 30 Nov 2026 10:00:00 GMT\r\n"
)
KEEP = HEAD + b"\r\nhello world\n"
CLOSE = HEAD + b"Connection: close\r\n\r\nhello world\n"


class Floor(asyncio.Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        if self.parser.should_keep_alive():
            self.transport.write(KEEP)
        else:  # wrk's Connection: close
            self.transport.write(CLOSE)
            self.transport.close()


if __name__ == "__main__":
    serve_asyncio(Floor, 3000)
