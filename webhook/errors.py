"""One JSON error shape for every failure: {"error": "<code>", "message": "<sentence>"}."""

from __future__ import annotations

import logging
import re
import traceback

from flask import Flask, Response, jsonify
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import HTTPException

from webhook.db import NOT_MIGRATED, UPGRADE_HINT, describe_error, is_disconnect, is_schema_missing

log = logging.getLogger(__name__)


class APIError(Exception):
    """An expected failure with the status and code the client should see."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class PlivoError(APIError):
    """Plivo could not do what was asked; `status` and `code` are what our own API answers."""


class BadParameter(APIError):
    """A request parameter or field is missing or malformed; the code names it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(400, f"invalid_{name}", message)
        self.name = name


def error_response(status: int, code: str, message: str) -> Response:
    """The JSON error body with its status."""
    response = jsonify(error=code, message=message)
    response.status_code = status
    return response


def not_migrated_response() -> Response:
    """503 saying the schema is missing, and what the operator runs to fix it."""
    response = error_response(
        503, "database_not_migrated", f"The service is not ready: {NOT_MIGRATED}; {UPGRADE_HINT}"
    )
    response.headers["Retry-After"] = "30"
    return response


def _code_for(exc: HTTPException) -> str:
    return re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")


def init_app(app: Flask) -> None:
    """Register the error handlers."""

    @app.errorhandler(APIError)
    def _api_error(exc: APIError) -> Response:
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        response = error_response(exc.code or 500, _code_for(exc), exc.description or "")
        methods = getattr(exc, "valid_methods", None)
        if methods:
            response.headers["Allow"] = ", ".join(methods)
        return response

    @app.errorhandler(DBAPIError)
    def _database_error(exc: DBAPIError) -> Response:
        if is_schema_missing(exc):
            log.error("%s; %s", NOT_MIGRATED, UPGRADE_HINT, extra={"error": describe_error(exc)})
            return not_migrated_response()
        if is_disconnect(exc):
            log.warning("database unavailable", extra={"error": describe_error(exc)})
            response = error_response(
                503, "database_unavailable", "The database cannot be reached; try again shortly"
            )
            response.headers["Retry-After"] = "5"
            return response
        # Not log.exception: the exception's text quotes the failing input (see describe_error).
        log.error(
            "database error",
            extra={
                "error": describe_error(exc),
                "statement": (exc.statement or "")[:500],
                "where": "".join(traceback.format_tb(exc.__traceback__)[-3:]),
            },
        )
        return error_response(
            500, "internal_error", "The server failed; the request was not stored"
        )
