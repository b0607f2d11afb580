"""What the staff API refuses before reading a request: anything the audit could not record
exactly, or the database could not hold."""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from flask import request

from webhook.errors import APIError, BadParameter
from webhook.recordings import CONTROL_CHARACTERS, RECORDING_ID

# gunicorn's default limit_request_line: behind it a longer request line never reaches the app;
# other servers (the development server, tests) are held to the same bound here.
REQUEST_TARGET_LIMIT = 4094
PARAMETER_NAME = re.compile(r"^[a-z_]{1,40}$")


def request_target_length() -> int:
    """The length of the path and query as they arrived (path decoded, query raw)."""
    return len(request.path) + len(request.query_string)


def check_request() -> None:
    """Refuse an over-long request (414), a query that is not UTF-8, or a parameter holding
    control characters (400 naming it), so that what is audited is exactly what was asked."""
    if request_target_length() > REQUEST_TARGET_LIMIT:
        raise APIError(
            414,
            "request_too_long",
            f"The path and query are longer than {REQUEST_TARGET_LIMIT} characters",
        )
    try:
        # Decoded strictly here: the parser of request.args replaces bad bytes with U+FFFD.
        for field in request.query_string.replace(b"+", b" ").split(b"&"):
            unquote_to_bytes(field).decode("utf-8")
    except UnicodeDecodeError:
        raise BadParameter("query", "the query string is not valid UTF-8") from None
    for name, values in request.args.lists():
        if not PARAMETER_NAME.match(name):
            if CONTROL_CHARACTERS.search(name):
                raise BadParameter("query", "a parameter name contains control characters")
            continue
        if any(CONTROL_CHARACTERS.search(v) for v in values):
            raise BadParameter(name, f"{name} contains control characters")


def check_recording_id(recording_id: str) -> str:
    """A recording id from a path, as Plivo forms them (1 to 64 letters, digits, . _ -)."""
    if not RECORDING_ID.match(recording_id):
        raise BadParameter(
            "recording_id",
            "recording_id must be 1 to 64 letters, digits, '.', '_' or '-'",
        )
    return recording_id


def check_text(name: str, value: object, limit: int, multiline: bool = False) -> str | None:
    """A text field of a JSON body: a string of at most `limit` characters that the database can
    store (no NUL or other control characters, save line breaks and tabs when `multiline`)."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise BadParameter(name, f"{name} must be a string of at most {limit} characters")
    checked = re.sub(r"[\r\n\t]", "", value) if multiline else value
    if CONTROL_CHARACTERS.search(checked):
        raise BadParameter(name, f"{name} contains control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadParameter(name, f"{name} is not valid Unicode text") from None
    return value
