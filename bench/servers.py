"""Helper servers the benchmarks run as separate processes, so they never share a GIL with the
process being measured or with the load generator.

    python bench/servers.py media --port P   # GET /media/<bytes>/<name>.<ext>: generated audio
    python bench/servers.py raw --port P [--close] [--procs N]   # a fixed 200 for every request

The media server streams `media_chunks(name, size)` (a repeating pseudo-random block), so a
1 GiB recording costs it 1 MiB of memory and the benchmark can compute the expected SHA-256
the same way without the bytes ever being stored.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from common import media_chunks

MEDIA_PATH = re.compile(r"^/media/(\d+)/([A-Za-z0-9._-]+)\.(mp3|wav)$")
CONTENT_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav"}


class MediaHandler(BaseHTTPRequestHandler):
    """Serves generated recordings; the size and the seed are in the path."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a real media host

    def do_GET(self) -> None:
        match = MEDIA_PATH.match(self.path.split("?", 1)[0])
        if match is None:
            self.send_error(404)
            return
        size, name, ext = int(match[1]), match[2], match[3]
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPES[ext])
        self.send_header("Content-Length", str(size))
        self.end_headers()
        for chunk in media_chunks(name, size):
            self.wfile.write(chunk)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: one line per request would cost more than the request."""


class MediaServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
HEADER_END = b"\r\n\r\n"
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class RawProtocol(asyncio.Protocol):
    """Reads whole requests (headers and Content-Length body) and answers each with "ok"."""

    def __init__(self, close: bool) -> None:
        self.close = close
        self.buffer = bytearray()
        self.answer = RESPONSE + (b"Connection: close\r\n" if close else b"") + b"\r\nok"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(HEADER_END)
            if end < 0:
                return
            match = CONTENT_LENGTH.search(self.buffer, 0, end + 2)
            total = end + 4 + (int(match[1]) if match else 0)
            if len(self.buffer) < total:
                return
            del self.buffer[:total]
            self.transport.write(self.answer)
            if self.close:
                self.transport.close()
                return


async def serve_raw(port: int, close: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: RawProtocol(close),
        "127.0.0.1",
        port,
        backlog=2048,
        reuse_address=True,
        reuse_port=True,  # several processes share the port, the kernel spreads connections
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["media", "raw"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--close", action="store_true", help="raw: close after each answer")
    parser.add_argument("--procs", type=int, default=1, help="raw: processes sharing the port")
    args = parser.parse_args()
    if args.kind == "media":
        with MediaServer(("127.0.0.1", args.port), MediaHandler) as server:
            server.serve_forever()
    else:
        for _ in range(args.procs - 1):
            if os.fork() == 0:
                break  # a child serves too; the whole process group is stopped together
        asyncio.run(serve_raw(args.port, args.close))


if __name__ == "__main__":
    main()
