"""Structured logs: one JSON line per request and per job, to stdout."""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
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
        second, second_text = self._last_second
        if int(record.created) != second:
            second = int(record.created)
            second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._last_second = (second, second_text)
        entry: dict[str, Any] = {
            "ts": f"{second_text}.{int(record.msecs):03d}Z",
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


def init_app(app: Flask) -> None:
    """Bind a request id to every request and log one line when it ends."""
    if not app.testing:
        configure()
    log = logging.getLogger("webhook.request")

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
            request_g.request_id = secrets.token_hex(16)
        request_g.started = time.perf_counter()

    @app.after_request
    def _log_request(response: Response) -> Response:
        ended = time.perf_counter()
        req = request._get_current_object()  # type: ignore[attr-defined]
        from_g = g._get_current_object().get
        request_id = from_g("request_id", "")
        response.headers["X-Request-ID"] = request_id
        log.info(
            "request",
            extra={
                "method": req.method,
                "path": req.path,
                "status": response.status_code,
                "ms": round((ended - from_g("started", ended)) * 1000, 2),
                "request_id": request_id or None,
                "recording_id": from_g("recording_id"),
                "staff": from_g("staff_name"),
                "remote_addr": req.remote_addr,
                **from_g("log_fields", {}),
            },
        )
        return response
