"""What Plivo calls, through one door: read the body, verify the signature over exactly the fields
that will be used, let the handler for that kind validate and store, log the callback as received
with its nonce, commit, 200."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Request, Response, current_app, g, request
from sqlalchemy import Engine, Table
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge

from webhook import services
from webhook.config import Settings
from webhook.db import execute_autocommitted, request_session
from webhook.errors import APIError, BadParameter
from webhook.members import (
    UNSETTLED_SLACK,
    parse_member_event,
    record_member_event,
    refresh_recording,
)
from webhook.models import CallbackLog, Status, utcnow
from webhook.recordings import (
    CAMEL_NAMES,
    insert_ignoring_conflict,
    new_recording_row,
    parse_report,
    record_report,
)
from webhook.signature import NONCE_HEADER, SIGNATURE_HEADERS, signature_matches

bp = Blueprint("callbacks", __name__)
CALLBACK_LOG: Table = CallbackLog.__table__  # type: ignore[assignment]  # a Table for Core inserts
NONCE_UNIQUE = "uq_callback_log_nonce"
log = logging.getLogger(__name__)

CALLBACK_METHODS = ("POST", "GET")
KEPT_HEADERS = (
    *SIGNATURE_HEADERS,
    NONCE_HEADER,
    "User-Agent",
    "Content-Type",
    "Content-Length",
    "Transfer-Encoding",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Request-ID",
)
# Each of Plivo's two spellings of a field, mapped to the other: one may not override its twin.
TWINS = {**CAMEL_NAMES, **{snake: camel for camel, snake in CAMEL_NAMES.items()}}


@dataclass(frozen=True)
class Verified:
    """A callback whose signature matched: the fields it signed, and how it was signed."""

    fields: dict[str, str]
    verdict: str
    nonce: str


@dataclass(frozen=True)
class Outcome:
    """What a handler did with a callback: the answer's body and what the log row says."""

    answer: dict[str, Any]
    recording_id: str | None = None
    duplicate: bool = False


Handler = Callable[[Session, Mapping[str, str]], Outcome]
# Which kind of callback signed fields are, and the handler that stores that kind.
Dispatch = Callable[[Mapping[str, str]], tuple[str, Handler]]


def _refuse(code: str, message: str, checked_url: str | None = None) -> APIError:
    log.warning(
        "callback refused",
        extra={
            "reason": code,
            "remote_addr": request.remote_addr,
            "request_id": g.request_id,
            # The URL the signature was computed over: a wrong PUBLIC_URL shows here at once.
            "checked_url": checked_url,
        },
    )
    return APIError(403, code, message)


def signed_fields(args: MultiDict[str, str], form: MultiDict[str, str] | None) -> dict[str, str]:
    """The callback's fields, read only from what the V3 signature covers: the URL's query and,
    for a POST, its form body. A field given twice (repeated, in both the query and the body, or
    under both of Plivo's spellings) with different values is refused: none may override another."""
    pairs = list(args.items(multi=True))
    if form is not None:
        pairs += form.items(multi=True)
    fields: dict[str, str] = {}
    for name, value in pairs:
        for seen in (name, TWINS.get(name)):
            if seen is not None and seen in fields and fields[seen] != value:
                canonical = CAMEL_NAMES.get(name, name)
                raise BadParameter(
                    canonical, f"{canonical} is given more than once with different values"
                )
        fields[name] = value
    return fields


def verify(settings: Settings, req: Request) -> Verified:
    """Check the V3 (or Ma-V3) signature over the public URL: the signed fields, or 403."""
    if not settings.plivo_auth_token or not settings.public_url:
        # Fail closed, but with 503 so Plivo retries once the service is configured.
        raise APIError(
            503,
            "callbacks_not_configured",
            "PLIVO_AUTH_TOKEN and PUBLIC_URL must be set before callbacks are accepted",
        )
    headers = req.headers
    nonce = headers.get(NONCE_HEADER, "")
    signed = {h: headers.get(h, "") for h in SIGNATURE_HEADERS}
    if not nonce or not any(signed.values()):
        raise _refuse(
            "missing_signature", "The X-Plivo-Signature-V3 and nonce headers are required"
        )
    if len(nonce) > 128:
        raise _refuse("bad_signature", "The signature nonce is too long")
    method = req.method
    form = req.form if method == "POST" else None
    # Behind a TLS-terminating router the socket says http; Plivo signed the public https URL.
    url = settings.public_url + req.path
    query = req.query_string
    if query:
        url += "?" + query.decode("utf-8", "replace")
    params = {key: form.getlist(key) for key in form} if form is not None else {}
    tokens = {"v3": settings.plivo_auth_token, "ma-v3": settings.plivo_main_auth_token}
    for header, verdict in SIGNATURE_HEADERS.items():
        token = tokens[verdict]
        if (
            signed[header]
            and token
            and signature_matches(signed[header], token, method, url, params, nonce)
        ):
            return Verified(signed_fields(req.args, form), verdict, nonce)
    raise _refuse("bad_signature", "The callback's signature does not match", checked_url=url)


# Each kept header's name as the log writes it, with its key in the WSGI environ.
_KEPT_ENVIRON = {
    name: ("" if name in ("Content-Type", "Content-Length") else "HTTP_")
    + name.upper().replace("-", "_")
    for name in KEPT_HEADERS
}


def kept_headers(environ: Mapping[str, Any]) -> dict[str, str]:
    """The headers the callback log keeps, read from the request's WSGI environ (a header sent
    more than once is kept as the server joined it)."""
    kept = {}
    for name, key in _KEPT_ENVIRON.items():
        value = environ.get(key)
        # As request.headers reads them: CONTENT_TYPE and CONTENT_LENGTH only when not empty.
        if value is not None and (value or key.startswith("HTTP_")):
            kept[name] = value
    return kept


def read_body(req: Request) -> str:
    """The raw body as it arrived, whatever the method (NUL and bytes that are not UTF-8 kept as
    backslash escapes); 413 when it is over the limit, chunked or not."""
    raw = req.get_data(cache=True)
    limit = req.max_content_length
    # Werkzeug stops reading a chunked body at the limit without saying so: a body that fills
    # the limit exactly may have been cut short, so it is refused rather than judged cut.
    if limit is not None and req.content_length is None and len(raw) >= limit:
        raise RequestEntityTooLarge()
    return raw.decode("utf-8", "backslashreplace").replace("\0", "\\x00")


def receive(dispatch: Dispatch) -> Response:
    """The one door: verify, let the handler for the kind validate and store, log the callback
    as received, commit, 200.

    The log row carries the nonce under a unique index and is never deleted, so a nonce stays
    refused for as long as the signed request it came with can be read back from the log.
    """
    # The request and the app themselves, each read once: every attribute read through Flask's
    # proxies costs as much as a small function (a callback would read some thirty).
    req: Request = request._get_current_object()  # type: ignore[attr-defined]
    method = req.method
    if method not in CALLBACK_METHODS:
        # Flask answers HEAD on every GET route; a HEAD is not a callback.
        raise APIError(405, "method_not_allowed", "Callbacks are POST or GET")
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    svc = services(app)
    body = read_body(req)
    verified = verify(svc.settings, req)
    kind, handle = dispatch(verified.fields)
    entry = {
        "received_at": utcnow(),
        "kind": kind,
        "method": method,
        "remote_addr": req.remote_addr,
        "headers": kept_headers(req.environ),
        "body": body,
        "query": req.query_string.decode("utf-8", "backslashreplace"),
        "signature_verdict": verified.verdict,
        "nonce": verified.nonce,
    }
    in_one_statement = ONE_STATEMENT.get(handle)
    outcome = None
    if in_one_statement is not None and svc.on_postgresql:
        outcome = in_one_statement(svc.engine, verified.fields, entry)
    if outcome is None:
        session = request_session()
        outcome = handle(session, verified.fields)
        logged = insert_ignoring_conflict(
            session,
            CallbackLog,
            {**entry, "recording_id": outcome.recording_id, "duplicate": outcome.duplicate},
        )
        if not logged:
            session.rollback()
            raise _refuse("replayed_nonce", "This signature nonce was used before")
        session.commit()
    request_g = g._get_current_object()
    request_g.recording_id = outcome.recording_id
    # On the request's own log line (webhook.logs): one line per callback.
    request_g.log_fields = {"callback": kind, "duplicate": outcome.duplicate}
    # What jsonify answers, from the app at hand rather than through its proxy again.
    answer: Response = app.json.response(outcome.answer)
    return answer


def store_recording(session: Session, fields: Mapping[str, str]) -> Outcome:
    """A finished recording: stored idempotently by recording_id and queued for the archive."""
    report = parse_report(fields)
    is_new = record_report(session, report, now=utcnow())
    refresh_recording(session, report.recording_id)
    return Outcome(
        {"status": "accepted" if is_new else "duplicate", "recording_id": report.recording_id},
        recording_id=report.recording_id,
        duplicate=not is_new,
    )


# A recording callback on PostgreSQL that needs nothing more than its row and its log entry,
# stored and logged in one autocommitted statement run as written (psycopg's parameter style,
# nothing to compile): the recording inserted, the callback logged with its nonce under the
# unique index, so that a replayed nonce fails the whole statement and leaves nothing stored.
# A callback that needs more (a recording started through the API moves to pending, or members
# of the conference may have been present, so its participants must be recomputed with it)
# writes nothing here and says so: it takes the general path, in one transaction.
RECORDING_AND_LOG = """
WITH more AS (
    SELECT EXISTS (SELECT FROM recordings
                   WHERE recording_id = %(recording_id)s AND status = %(recording)s)
        OR EXISTS (SELECT FROM conference_members m
                   WHERE m.conference_name = %(conference_name)s
                     AND (m.last_seen_at >= %(seen_since)s
                          OR m.conference_uuid = %(conference_uuid)s)) AS needed
), rec AS (
    INSERT INTO recordings (
        recording_id, conference_name, conference_uuid, api_id, record_url, file_format,
        duration_ms, duration_s, start_ms, end_ms, status, next_attempt_at, attempts,
        legal_hold, created_at, updated_at)
    SELECT
        %(recording_id)s, %(conference_name)s, %(conference_uuid)s, %(api_id)s,
        %(record_url)s, %(file_format)s, %(duration_ms)s, %(duration_s)s, %(start_ms)s,
        %(end_ms)s, %(status)s, %(next_attempt_at)s, %(attempts)s, %(legal_hold)s,
        %(created_at)s, %(updated_at)s
    WHERE NOT (SELECT needed FROM more)
    ON CONFLICT (recording_id) DO NOTHING
    RETURNING 1
), logged AS (
    INSERT INTO callback_log (
        received_at, kind, recording_id, method, remote_addr, headers, body, query,
        signature_verdict, nonce, duplicate)
    SELECT
        %(received_at)s, %(kind)s, %(recording_id)s, %(method)s, %(remote_addr)s,
        CAST(%(headers)s AS json), %(body)s, %(query)s, %(signature_verdict)s, %(nonce)s,
        NOT EXISTS (SELECT FROM rec)
    WHERE NOT (SELECT needed FROM more)
    RETURNING 1
)
SELECT (SELECT needed FROM more), EXISTS (SELECT FROM rec)
"""


def store_recording_in_one_statement(
    engine: Engine, fields: Mapping[str, str], entry: dict[str, Any]
) -> Outcome | None:
    """store_recording and the callback's log row in one round trip (PostgreSQL); None, having
    written nothing, when the callback needs the general path."""
    report = parse_report(fields)
    row = new_recording_row(report, entry["received_at"])
    values = {
        **entry,
        **row,
        "headers": json.dumps(entry["headers"]),
        "recording": Status.RECORDING.value,
        "seen_since": dt.datetime.fromtimestamp(row["start_ms"] / 1000, dt.UTC) - UNSETTLED_SLACK,
    }
    try:
        needed, inserted = execute_autocommitted(engine, RECORDING_AND_LOG, values)
    except IntegrityError as error:
        if getattr(getattr(error.orig, "diag", None), "constraint_name", None) == NONCE_UNIQUE:
            raise _refuse("replayed_nonce", "This signature nonce was used before") from None
        raise
    if needed:
        return None
    return Outcome(
        {"status": "accepted" if inserted else "duplicate", "recording_id": report.recording_id},
        recording_id=report.recording_id,
        duplicate=not inserted,
    )


def store_member_event(session: Session, fields: Mapping[str, str]) -> Outcome:
    """A member entered or left a conference: kept once, folded into the conference's members."""
    event = parse_member_event(fields)
    is_new = record_member_event(session, event, now=utcnow())
    return Outcome(
        {"status": "accepted" if is_new else "duplicate", "conference_action": event.action},
        duplicate=not is_new,
    )


def ignore_member_event(session: Session, fields: Mapping[str, str]) -> Outcome:
    """A conference event that says nothing of who is there (digits, floor…): acknowledged."""
    return Outcome({"status": "ignored", "conference_action": fields["ConferenceAction"][:32]})


def conference_callback(fields: Mapping[str, str]) -> tuple[str, Handler]:
    """A recording's callback; a Conference XML callbackUrl also receives member events."""
    action = fields.get("ConferenceAction", "").lower()
    if action in ("enter", "exit"):
        return "member", store_member_event
    if action and action != "record":
        return "member", ignore_member_event
    return "recording", store_recording


# Handlers that PostgreSQL runs with their log row in one statement, instead of handler + log.
ONE_STATEMENT: dict[
    Handler, Callable[[Engine, Mapping[str, str], dict[str, Any]], Outcome | None]
] = {store_recording: store_recording_in_one_statement}


@bp.route("/plivo/recording", methods=CALLBACK_METHODS)
def recording_callback() -> Response:
    """Plivo's recording callback (and the member events of a Conference XML callbackUrl)."""
    return receive(conference_callback)


@bp.route("/plivo/transcription", methods=CALLBACK_METHODS)
def transcription_callback() -> Response:
    """Plivo's transcription callback: a recording's transcript, or why there is none."""
    # Imported here: webhook.transcripts builds its handler on this module's Outcome.
    from webhook.transcripts import store_transcription

    return receive(lambda _fields: ("transcription", store_transcription))
