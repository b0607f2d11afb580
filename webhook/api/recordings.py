"""Compliance staff find, read, play and export recordings."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

from flask import (
    Blueprint,
    Response,
    g,
    jsonify,
    request,
    stream_with_context,
)
from flask.typing import ResponseReturnValue

from webhook import actions
from webhook.archive.deletion import deletion_history
from webhook.audit import note_recordings
from webhook.auth import require
from webhook.db import request_session
from webhook.edge import check_recording_id
from webhook.errors import APIError, BadParameter
from webhook.models import Role
from webhook.recordings import legal_hold_history, to_json
from webhook.search import Cursor, page_of_recordings, parse_filter, recordings_page, shown
from webhook.transcripts import find as find_transcript
from webhook.transcripts import to_json as transcript_json

bp = Blueprint("recordings", __name__)

EXPORT_BATCH = 1000
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
EXPORT_COLUMNS = (
    "recording_id",
    "conference_name",
    "status",
    "file_format",
    "duration_ms",
    "start_ms",
    "end_ms",
    "participants",
    "archive_key",
    "archive_size",
    "archive_sha256",
    "archived_at",
    "retain_until",
    "legal_hold",
    "attempts",
    "last_error",
    "plivo_deleted_at",
    "transcript_status",
    "transcript_sha256",
    "snippet",
)


@bp.get("/recordings")
@require(Role.COMPLIANCE)
def list_recordings() -> Response:
    """Recordings matching the filters, newest first, a page at a time."""
    recordings, next_cursor = recordings_page(request_session(), request.args)
    note_recordings(*(r["recording_id"] for r in recordings))
    return jsonify(recordings=recordings, next_cursor=next_cursor)


@bp.get("/recordings/<recording_id>")
@require(Role.COMPLIANCE)
def get_recording(recording_id: str) -> Response:
    """One recording: metadata, participants, archive, legal hold and Plivo deletion history."""
    body = to_json(actions.get_recording(recording_id))
    body["legal_hold_history"] = legal_hold_history(request_session(), recording_id)
    body["plivo_deletions"] = deletion_history(request_session(), recording_id)
    return jsonify(body)


@bp.get("/recordings/<recording_id>/audio")
@require(Role.COMPLIANCE)
def get_audio(recording_id: str) -> ResponseReturnValue:
    """The audio: a short-lived presigned S3 link, or the bytes from a local archive."""
    return actions.audio_response(actions.get_recording(recording_id))


def as_text_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text, never runs as a formula (OWASP's CSV injection
    advice): a string starting with = + - @ tab or carriage return gets a leading apostrophe.
    Every E.164 number starts with +. NDJSON keeps values exact."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


def _export_rows() -> Iterator[dict[str, object]]:
    filters = parse_filter(request.args)
    session = request_session()
    after: Cursor | None = None
    while True:
        batch = page_of_recordings(session, filters, after, EXPORT_BATCH)
        for body in shown(session, filters, batch):
            archive = body.pop("archive") or {}
            transcript = body.get("transcript") or {}
            body.update(
                {
                    "archive_key": archive.get("key"),
                    "archive_size": archive.get("size"),
                    "archive_sha256": archive.get("sha256"),
                    "archived_at": archive.get("archived_at"),
                    "transcript_status": transcript.get("status"),
                    "transcript_sha256": transcript.get("sha256"),
                }
            )
            yield body
        if len(batch) < EXPORT_BATCH:
            return
        after = Cursor(batch[-1].start_ms, batch[-1].id)
        # Keep memory flat: forget the rows already written.
        session.expunge_all()


@bp.get("/recordings/export")
@require(Role.COMPLIANCE)
def export_recordings() -> Response:
    """Every matching recording's metadata, streamed as CSV or NDJSON."""
    fmt = request.args.get("format", "ndjson")
    if fmt not in ("csv", "ndjson"):
        raise BadParameter("format", "format must be csv or ndjson")
    parse_filter(request.args)  # a bad filter is a 400 now, not a broken stream later

    def ndjson() -> Iterator[str]:
        for row in _export_rows():
            yield json.dumps(row, separators=(",", ":")) + "\n"

    def as_csv() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=EXPORT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in _export_rows():
            row["participants"] = ";".join(
                f"{p['from'] or ''}>{p['to'] or ''}"
                for p in row["participants"]  # type: ignore[attr-defined]
            )
            writer.writerow({k: as_text_cell(v) for k, v in row.items()})
            if buffer.tell() > 64 * 1024:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()

    body = as_csv() if fmt == "csv" else ndjson()
    mimetype = "text/csv" if fmt == "csv" else "application/x-ndjson"
    response = Response(stream_with_context(body), mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="recordings.{fmt}"'
    return response


@bp.get("/recordings/<recording_id>/transcript")
@require(Role.COMPLIANCE)
def get_transcript(recording_id: str) -> Response:
    """A recording's transcript: the text exactly as Plivo sent it, its digest and archive."""
    note_recordings(check_recording_id(recording_id))
    transcript = find_transcript(request_session(), recording_id)
    if transcript is None:
        raise APIError(404, "transcript_not_found", f"No transcript of recording {recording_id!r}")
    return jsonify(transcript_json(transcript))


@bp.put("/recordings/<recording_id>/legal-hold")
@require(Role.ADMIN)
def set_legal_hold(recording_id: str) -> Response:
    """Place or lift a legal hold: on the S3 object (Object Lock) and in the database."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("on"), bool):
        raise BadParameter("on", 'the body must be {"on": true|false, "reason": "..."}')
    return jsonify(
        to_json(actions.set_legal_hold(recording_id, body["on"], body.get("reason"), g.staff_name))
    )
