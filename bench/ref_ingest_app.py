"""The reference for callback ingest: the least work that keeps the callback contract, served by
gunicorn under exactly the service's settings (`bench/ingest.py` runs it beside the service).

What it keeps, as the service does: the V3 signature checked over the public URL (the same
function as the service, so the reference does no less of that work); every field validated and a
bad one answered 400; the nonce refused on replay (unique in the callback log); the recording
inserted idempotently with its archive job; the raw callback logged; and all of it in one durable
commit of one statement, in a single round trip on a raw psycopg connection per thread. What it
leaves out: everything else (no ORM or Core, no pool checks, no structured logs, no error pages).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from decimal import Decimal, InvalidOperation

import psycopg
from flask import Flask, request
from psycopg.types.json import Jsonb

from webhook.signature import NONCE_HEADER, signature_matches

STATEMENT = """
WITH rec AS (
    INSERT INTO recordings (recording_id, conference_name, api_id, record_url, file_format,
                            duration_s, duration_ms, start_ms, end_ms, status, attempts,
                            next_attempt_at, archive_key, legal_hold, created_at, updated_at)
    VALUES (%(recording_id)s, %(conference_name)s, %(api_id)s, %(record_url)s, 'mp3',
            %(duration_s)s, %(duration_ms)s, %(start_ms)s, %(end_ms)s, 'pending', 0,
            now(), %(archive_key)s, false, now(), now())
    ON CONFLICT (recording_id) DO NOTHING
    RETURNING 1
)
INSERT INTO callback_log (received_at, kind, recording_id, method, remote_addr, headers, body,
                          query, signature_verdict, nonce, duplicate)
SELECT now(), 'recording', %(recording_id)s, 'POST', %(remote_addr)s, %(headers)s, %(body)s,
       '', 'v3', %(nonce)s, NOT EXISTS (SELECT FROM rec)
RETURNING duplicate
"""


def _ms(raw: str | None) -> int | None:
    if not raw:
        return None
    number = Decimal(raw)
    if not number.is_finite() or number.adjusted() > 18:
        raise InvalidOperation
    return int(number)


def create_app() -> Flask:
    """POST /plivo/recording keeping the contract with one statement per callback."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    public_url = os.environ["PUBLIC_URL"]
    token = os.environ["PLIVO_AUTH_TOKEN"]
    database_url = os.environ["DATABASE_URL"]
    local = threading.local()

    def connection() -> psycopg.Connection[tuple[object, ...]]:
        conn = getattr(local, "conn", None)
        if conn is None or conn.closed:
            conn = local.conn = psycopg.connect(database_url, autocommit=True)
        return conn

    @app.post("/plivo/recording")
    def recording() -> tuple[str, int]:
        body = request.get_data(cache=True)
        nonce = request.headers.get(NONCE_HEADER, "")
        signature = request.headers.get("X-Plivo-Signature-V3", "")
        params = {key: request.form.getlist(key) for key in request.form}
        url = public_url + request.path
        if not nonce or not signature_matches(signature, token, "POST", url, params, nonce):
            return '{"error": "bad_signature"}', 403
        form = request.form
        recording_id = form.get("recording_id", "")
        record_url = form.get("record_url", "")
        if not recording_id or not record_url:
            return '{"error": "invalid_recording_id"}', 400
        try:
            duration_ms = _ms(form.get("recording_duration_ms"))
            start_ms = _ms(form.get("recording_start_ms")) or 0
            end_ms = _ms(form.get("recording_end_ms"))
        except (InvalidOperation, ValueError):
            return '{"error": "invalid_duration"}', 400
        day = dt.datetime.fromtimestamp(start_ms / 1000, dt.UTC)
        values = {
            "recording_id": recording_id,
            "conference_name": form.get("conference_name"),
            "api_id": form.get("api_id"),
            "record_url": record_url,
            "duration_s": None if duration_ms is None else duration_ms // 1000,
            "duration_ms": duration_ms,
            "start_ms": start_ms,
            "end_ms": end_ms,
            "archive_key": f"recordings/{day:%Y/%m/%d}/{recording_id}.mp3",
            "remote_addr": request.remote_addr,
            "headers": Jsonb({NONCE_HEADER: nonce, "X-Plivo-Signature-V3": signature}),
            "body": body.decode("utf-8", "backslashreplace"),
            "nonce": nonce,
        }
        try:
            row = connection().execute(STATEMENT, values).fetchone()
        except psycopg.errors.UniqueViolation:
            return '{"error": "replayed_nonce"}', 403
        duplicate = bool(row and row[0])
        status = "duplicate" if duplicate else "accepted"
        return json.dumps({"status": status, "recording_id": recording_id}), 200

    return app
