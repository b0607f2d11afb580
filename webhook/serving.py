"""The web process's gunicorn worker: a greenlet per connection, and deadlines on every client.

With a thread per connection, a few clients that send or read one byte every few seconds hold
every thread and Plivo's callbacks wait behind them. Here a connection costs a greenlet, not a
thread, and no client holds anything for long:

- the request head must arrive within `REQUEST_READ_SECONDS` (also the idle limit of a kept-alive
  connection), else the connection is closed;
- the body (up to the app's `MAX_CONTENT_LENGTH`) is read here, before the app runs, within
  `REQUEST_READ_SECONDS` more, else 408: the app never waits on a client, so a slow body holds no
  database connection;
- each write of the response must be taken by the client within `RESPONSE_WRITE_SECONDS`, else
  the connection is cut (an export that stops being read ends there and frees its connection).

The Procfile selects it with `--worker-class webhook.serving.Worker`.
"""

from __future__ import annotations

import gc
import io
import json
import socket
import sys
from collections.abc import Iterable, Iterator
from contextlib import suppress
from typing import Any

import gevent
from gunicorn.http.body import Body, LengthReader
from gunicorn.workers.ggevent import GeventWorker

# Until the app is loaded (it never waits longer than this for a head before that).
DEFAULT_READ_SECONDS = 10.0
DEFAULT_WRITE_SECONDS = 30.0
# Bodies are read ahead up to the app's limit; this one holds for an app without one.
DEFAULT_BODY_LIMIT = 1024 * 1024


class Worker(GeventWorker):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's gevent worker with deadlines for reading requests and writing responses."""

    wsgi: Any  # the app, set by gunicorn's load_wsgi
    read_seconds = DEFAULT_READ_SECONDS
    write_seconds = DEFAULT_WRITE_SECONDS
    body_limit = DEFAULT_BODY_LIMIT

    def init_process(self) -> None:
        # psycopg picks how it waits for the server when it is imported: imported before gevent
        # patched `select`, it would block the whole process on every query.
        if "psycopg" in sys.modules:
            raise RuntimeError("psycopg was imported before gevent patched the worker")
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        waiting = sys.modules.get("psycopg.waiting")
        if waiting is not None and waiting.wait is getattr(waiting, "wait_c", None):
            raise RuntimeError("psycopg waits in C, which would block every other connection")
        extensions = getattr(self.wsgi, "extensions", {})
        if "webhook" in extensions:
            settings = extensions["webhook"].settings
            self.read_seconds = float(settings.request_read_seconds)
            self.write_seconds = float(settings.response_write_seconds)
        limit = getattr(self.wsgi, "config", {}).get("MAX_CONTENT_LENGTH")
        if limit:
            self.body_limit = int(limit)
        self.wsgi = _taking_turns(self.wsgi)
        # The app and everything it imported live as long as this process: kept out of every
        # later garbage collection, so that no full collection walks them mid-request.
        gc.freeze()

    def timeout_ctx(self) -> gevent.Timeout:
        """The bound on reading a request head (gunicorn closes the connection when it expires)."""
        return gevent.Timeout(self.read_seconds, False)

    def handle_request(self, listener_name: Any, req: Any, sock: socket.socket, addr: Any) -> Any:
        sock.settimeout(self.write_seconds)
        deadline = gevent.Timeout(self.read_seconds)
        try:
            with deadline:
                self._read_body_ahead(req, sock)
        except gevent.Timeout as expired:
            if expired is not deadline:
                raise
            self.log.info("request body not received within %g s from %s", self.read_seconds, addr)
            self._send_request_timeout(sock)
            raise StopIteration() from None
        try:
            return super().handle_request(listener_name, req, sock, addr)
        except TimeoutError:
            self.log.info("response not taken within %g s by %s; closed", self.write_seconds, addr)
            raise StopIteration() from None

    def _read_body_ahead(self, req: Any, sock: socket.socket) -> None:
        """Replace the request's body, still on the socket, by the same bytes held in memory."""
        if req.body is None:
            return
        reader = req.body.reader
        if isinstance(reader, LengthReader) and reader.length > self.body_limit:
            # The app refuses it from the header alone (413); the rest is never read.
            req.must_close = True
            return
        if getattr(req, "_expected_100_continue", False):
            # The client waits for this before it sends the body; gunicorn would send it only
            # once the app runs, after the body this waits for.
            req._expected_100_continue = False
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        data = req.body.read(self.body_limit + 1)
        if len(data) > self.body_limit:
            # A chunked body over the limit: the app sees more than it accepts and refuses it;
            # the connection cannot be reused, the rest of the body was not read.
            req.must_close = True
        req.body = Body(io.BytesIO(data))

    def _send_request_timeout(self, sock: socket.socket) -> None:
        body = json.dumps(
            {
                "error": "request_timeout",
                "message": f"The request body did not arrive within {self.read_seconds:g} seconds",
            }
        ).encode()
        head = (
            "HTTP/1.1 408 Request Timeout\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        with suppress(OSError):  # the client is gone or not reading; it is closed either way
            sock.sendall(head + body)


def _taking_turns(app: Any) -> Any:
    """The app, yielding to the other connections after each piece of a streamed response.

    A greenlet runs until it waits: an export whose client reads fast would otherwise build and
    send megabytes before a callback on the same process got a turn.
    """

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        body = app(environ, start_response)
        if isinstance(body, environ.get("wsgi.file_wrapper", ())):
            return body  # sent with sendfile, which waits cooperatively
        return _one_piece_at_a_time(body)

    return wsgi


def _one_piece_at_a_time(body: Iterable[bytes]) -> Iterator[bytes]:
    try:
        for piece in body:
            yield piece
            gevent.sleep(0)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
