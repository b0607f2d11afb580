"""Structured logs: one JSON line per request and per job, to stdout."""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, request

# Attributes every LogRecord has; anything else passed in `extra=` is a structured field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# One encoder for every line (json.dumps with options builds one per call).
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


class JSONFormatter(logging.Formatter):
    """Render a record as one JSON object: time (UTC), level, logger, message and any extra
    fields."""

    # The last second formatted and its text, as one tuple (threads share the formatter).
    _last_second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.timestamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)

    def timestamp(self, created: float, msecs: float) -> str:
        """`created` (seconds since the epoch) as the lines show it, to the millisecond."""
        second, second_text = self._last_second
        if int(created) != second:
            second = int(created)
            second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._last_second = (second, second_text)
        return f"{second_text}.{int(msecs):03d}Z"


JSONFormatter.converter = time.gmtime  # formatTime, should anything call it, in UTC as well


def configure(level: int = logging.INFO) -> None:
    """Send the service's logs to stdout as JSON lines (once per process)."""
    root = logging.getLogger("webhook")
    if any(isinstance(h.formatter, JSONFormatter) for h in root.handlers):
        return
    # No line shows the caller's file and line, the thread (id and name) or the process's name:
    # each record skips looking for them (the logging HOWTO's "Optimization"). For the whole
    # process, so `stack_info` and `stacklevel`, which the service does not use, have no effect
    # either, and no format may show %(thread)d, %(threadName)s or %(processName)s. The process
    # id stays: gunicorn's own lines print it.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


LineWriter = Callable[[str, dict[str, Any]], None]


def info_line_writer(logger: logging.Logger) -> LineWriter | None:
    """A function that writes an INFO line of `logger` straight to the JSON handler's stream, or
    None when `logger` may send its records anywhere else (a handler, a filter, or a logger
    without the JSON handler on the way). Decided when it is called: a handler added later is not
    written to, and neither a record factory nor anything patched into logging's dispatch sees
    the line.

    The line is the one JSONFormatter writes for `logger.info(msg, extra=fields)`, made without
    a LogRecord, its formatting or logging's dispatch, at half the cost (the request line is
    written on every request). Like a record, it is written only while `logger` is enabled for
    INFO.
    """
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters or current.disabled:
            return None
        handlers += current.handlers
        if not current.propagate:
            break
        current = current.parent
    if len(handlers) != 1:
        return None
    (stream_handler,) = handlers
    formatter = stream_handler.formatter
    # The exact classes: a subclass (a file that rotates or reopens, a formatter of its own)
    # does more than write the line.
    if type(stream_handler) is not logging.StreamHandler or stream_handler.filters:
        return None
    if type(formatter) is not JSONFormatter:
        return None
    name = logger.name
    enabled = logger.isEnabledFor

    def write(msg: str, fields: dict[str, Any]) -> None:
        if not enabled(logging.INFO) or stream_handler.level > logging.INFO:
            return
        now = time.time()
        stream_handler.acquire()
        try:
            line = _ENCODER.encode(
                {
                    "ts": formatter.timestamp(now, (now - int(now)) * 1000),
                    "level": "info",
                    "logger": name,
                    "msg": msg,
                    **fields,
                }
            )
            stream = stream_handler.stream
            stream.write(line + stream_handler.terminator)
            stream.flush()
        except Exception:  # noqa: BLE001 - as StreamHandler.emit: the line is lost, not the request
            stream_handler.handleError(logging.makeLogRecord({"msg": msg}))
        finally:
            stream_handler.release()

    return write


def new_request_id() -> str:
    """32 random hex digits. An id, not a secret: random's generator (seeded from the system's
    randomness, and again in each forked child) makes it without a system call."""
    return f"{random.getrandbits(128):032x}"


def init_app(app: Flask) -> None:
    """Bind a request id to every request and log one line when it ends."""
    if not app.testing:
        configure()
    log = logging.getLogger("webhook.request")
    # Tests see the line as a record (the JSON handler is only installed outside them).
    write_line = info_line_writer(log)

    @app.before_request
    def _bind_request_id() -> None:
        # The request and `g` themselves: every attribute read through Flask's proxies costs as
        # much as a small function, and this runs on every request.
        environ = request._get_current_object().environ  # type: ignore[attr-defined]
        request_g = g._get_current_object()
        incoming = environ.get("HTTP_X_REQUEST_ID", "")
        if incoming and incoming.isprintable():
            request_g.request_id = incoming[:64]
        else:
            request_g.request_id = new_request_id()
        request_g.started = time.perf_counter()

    @app.after_request
    def _log_request(response: Response) -> Response:
        ended = time.perf_counter()
        req = request._get_current_object()  # type: ignore[attr-defined]
        from_g = g._get_current_object().get
        request_id = from_g("request_id", "")
        response.headers["X-Request-ID"] = request_id
        fields = {
            "method": req.method,
            "path": req.path,
            "status": response.status_code,
            "ms": round((ended - from_g("started", ended)) * 1000, 2),
            "request_id": request_id or None,
            "recording_id": from_g("recording_id"),
            "staff": from_g("staff_name"),
            "remote_addr": req.remote_addr,
            **from_g("log_fields", {}),
        }
        if write_line is not None:
            write_line("request", fields)
        else:
            log.info("request", extra=fields)
        return response
