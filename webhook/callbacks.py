"""What Plivo calls: the recording callback. Verify → validate → store and queue → 200."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, g, jsonify, request
from sqlalchemy import Table, insert

from webhook import services
from webhook.db import request_session
from webhook.errors import APIError
from webhook.models import CallbackLog, SeenNonce, utcnow
from webhook.recordings import insert_ignoring_conflict, parse_report, record_report
from webhook.signature import NONCE_HEADER, SIGNATURE_HEADERS, signature_matches

bp = Blueprint("callbacks", __name__)
CALLBACK_LOG: Table = CallbackLog.__table__  # type: ignore[assignment]  # a Table for Core inserts
log = logging.getLogger(__name__)

KEPT_HEADERS = (
    *SIGNATURE_HEADERS,
    NONCE_HEADER,
    "User-Agent",
    "Content-Type",
    "Content-Length",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Request-ID",
)


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


def verify_signature() -> tuple[str, str]:
    """Check the V3 (or Ma-V3) signature over the public URL: (verdict, nonce), or 403."""
    settings = services(current_app).settings
    if not settings.plivo_auth_token or not settings.public_url:
        # Fail closed, but with 503 so Plivo retries once the service is configured.
        raise APIError(
            503,
            "callbacks_not_configured",
            "PLIVO_AUTH_TOKEN and PUBLIC_URL must be set before callbacks are accepted",
        )
    nonce = request.headers.get(NONCE_HEADER, "")
    signed = {h: request.headers.get(h, "") for h in SIGNATURE_HEADERS}
    if not nonce or not any(signed.values()):
        raise _refuse(
            "missing_signature", "The X-Plivo-Signature-V3 and nonce headers are required"
        )
    if len(nonce) > 128:
        raise _refuse("bad_signature", "The signature nonce is too long")
    # Behind a TLS-terminating router the socket says http; Plivo signed the public https URL.
    url = settings.public_url + request.path
    if request.query_string:
        url += "?" + request.query_string.decode("utf-8", "replace")
    params = (
        {key: request.form.getlist(key) for key in request.form} if request.method == "POST" else {}
    )
    tokens = {"v3": settings.plivo_auth_token, "ma-v3": settings.plivo_main_auth_token}
    for header, verdict in SIGNATURE_HEADERS.items():
        token = tokens[verdict]
        if (
            signed[header]
            and token
            and signature_matches(signed[header], token, request.method, url, params, nonce)
        ):
            return verdict, nonce
    raise _refuse("bad_signature", "The callback's signature does not match", url)


@bp.route("/plivo/recording", methods=["POST", "GET"])
def recording_callback() -> Response:
    """Plivo's recording callback: accepted (or a duplicate) → 200 once committed."""
    body = request.get_data(cache=True, as_text=True) if request.method == "POST" else ""
    verdict, nonce = verify_signature()
    action = request.values.get("ConferenceAction", "")
    if action and action.lower() != "record":
        # A Conference XML callbackUrl also receives member events (enter, exit, digits...).
        return jsonify(status="ignored", conference_action=action[:32])
    report = parse_report(request.values.to_dict())
    g.recording_id = report.recording_id

    session = request_session()
    now = utcnow()
    if not insert_ignoring_conflict(session, SeenNonce, {"nonce": nonce, "seen_at": now}):
        session.rollback()
        raise _refuse("replayed_nonce", "This signature nonce was used before")
    is_new = record_report(session, report, now=now)
    session.execute(
        insert(CALLBACK_LOG).values(
            received_at=now,
            recording_id=report.recording_id,
            method=request.method,
            remote_addr=request.remote_addr,
            headers={h: request.headers[h] for h in KEPT_HEADERS if h in request.headers},
            body=body,
            query=request.query_string.decode("utf-8", "replace"),
            signature_verdict=verdict,
            nonce=nonce,
            duplicate=not is_new,
        )
    )
    session.commit()
    log.info(
        "callback accepted",
        extra={
            "recording_id": report.recording_id,
            "duplicate": not is_new,
            "request_id": g.request_id,
        },
    )
    return jsonify(status="accepted" if is_new else "duplicate", recording_id=report.recording_id)
