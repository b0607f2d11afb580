"""Compliance staff find, read, play and export recordings."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    jsonify,
    redirect,
    request,
    stream_with_context,
)
from flask.typing import ResponseReturnValue
from sqlalchemy.orm import joinedload

from webhook import services
from webhook.archive.storage import StorageError
from webhook.audit import note_recordings
from webhook.auth import require
from webhook.db import request_session
from webhook.errors import APIError, BadParameter
from webhook.fulltext import snippets
from webhook.models import LegalHoldEvent, Recording, Role, Status
from webhook.recordings import find, legal_hold_history, participants_of, to_json
from webhook.search import Cursor, RecordingFilter, parse_filter, parse_limit, recordings_query
from webhook.transcripts import find as find_transcript
from webhook.transcripts import to_json as transcript_json

bp = Blueprint("recordings", __name__)

EXPORT_BATCH = 1000
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
    "transcript_status",
    "transcript_sha256",
    "snippet",
)


def _page(filters: RecordingFilter, after: Cursor | None, limit: int) -> list[Recording]:
    """Matching recordings with their transcript's summary (not its text) loaded alongside."""
    # Joined, not a second query: one transcript at most per recording, by a unique key.
    query = recordings_query(filters, after).options(joinedload(Recording.transcript))
    return list(request_session().scalars(query.limit(limit)))


def _with_snippets(
    filters: RecordingFilter, page: list[Recording], bodies: list[dict[str, Any]]
) -> None:
    """With `q`, each hit carries a short extract of its transcript, the words marked."""
    if filters.q is None:
        return
    found = snippets(request_session(), filters.q, [r.recording_id for r in page])
    for recording, body in zip(page, bodies, strict=True):
        body["snippet"] = found.get(recording.recording_id)


@bp.get("/recordings")
@require(Role.COMPLIANCE)
def list_recordings() -> Response:
    """Recordings matching the filters, newest first, a page at a time."""
    filters = parse_filter(request.args)
    limit = parse_limit(request.args.get("limit"))
    raw_cursor = request.args.get("cursor")
    after = Cursor.decode(raw_cursor) if raw_cursor else None
    session = request_session()
    rows = _page(filters, after, limit + 1)
    page, more = rows[:limit], len(rows) > limit
    note_recordings(*(r.recording_id for r in page))
    participants = participants_of(session, [r.id for r in page])
    next_cursor = Cursor(page[-1].start_ms, page[-1].id).encode() if more else None
    bodies = [to_json(r, participants[r.id]) for r in page]
    _with_snippets(filters, page, bodies)
    return jsonify(recordings=bodies, next_cursor=next_cursor)


def _get(recording_id: str) -> Recording:
    note_recordings(recording_id)
    recording = find(request_session(), recording_id)
    if recording is None:
        raise APIError(404, "recording_not_found", f"No recording {recording_id!r}")
    return recording


@bp.get("/recordings/<recording_id>")
@require(Role.COMPLIANCE)
def get_recording(recording_id: str) -> Response:
    """One recording: metadata, participants, archive, and its legal hold history."""
    body = to_json(_get(recording_id))
    body["legal_hold_history"] = legal_hold_history(request_session(), recording_id)
    return jsonify(body)


@bp.get("/recordings/<recording_id>/audio")
@require(Role.COMPLIANCE)
def get_audio(recording_id: str) -> ResponseReturnValue:
    """The audio: a short-lived presigned S3 link, or the bytes from a local archive."""
    recording = _get(recording_id)
    if recording.status != Status.ARCHIVED or not recording.archive_key:
        raise APIError(
            409, "not_archived", f"Recording {recording_id} is {recording.status}, not archived yet"
        )
    svc = services(current_app)
    url = svc.storage.presigned_url(
        recording.archive_key, recording.archive_version_id, svc.settings.presign_seconds
    )
    if url is not None:
        response = redirect(url, 302)
        response.headers["Cache-Control"] = "no-store"
        return response
    mimetype = "audio/mpeg" if recording.file_format == "mp3" else "audio/wav"
    response = Response(
        stream_with_context(svc.storage.read(recording.archive_key)), mimetype=mimetype
    )
    response.headers["Content-Length"] = str(recording.archive_size)
    response.headers["Content-Disposition"] = (
        f'attachment; filename="{recording.recording_id}.{recording.file_format}"'
    )
    response.headers["Digest"] = f"sha-256={recording.archive_sha256}"
    response.headers["Cache-Control"] = "no-store"
    return response


def _export_rows() -> Iterator[dict[str, object]]:
    filters = parse_filter(request.args)
    session = request_session()
    after: Cursor | None = None
    while True:
        batch = _page(filters, after, EXPORT_BATCH)
        participants = participants_of(session, [r.id for r in batch])
        bodies = [to_json(r, participants[r.id]) for r in batch]
        _with_snippets(filters, batch, bodies)
        for body in bodies:
            transcript = body.get("transcript") or {}
            archive = body.pop("archive") or {}
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
            writer.writerow(row)
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
    note_recordings(recording_id)
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
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 2000):
        raise BadParameter("reason", "reason must be a string of at most 2000 characters")
    if body["on"] and not (reason or "").strip():
        raise BadParameter("reason", "a reason is required to place a legal hold")
    recording = _get(recording_id)
    if recording.status != Status.ARCHIVED or not recording.archive_key:
        raise APIError(409, "not_archived", f"Recording {recording_id} is not archived yet")
    storage = services(current_app).storage
    transcript = recording.transcript
    try:
        storage.set_legal_hold(recording.archive_key, recording.archive_version_id, body["on"])
        # The transcript archived beside the audio is held (or released) with it.
        if transcript is not None and transcript.archive_key and transcript.archived_at:
            storage.set_legal_hold(
                transcript.archive_key, transcript.archive_version_id, body["on"]
            )
    except StorageError as exc:
        raise APIError(502, "legal_hold_failed", str(exc)) from None
    session = request_session()
    recording.legal_hold = body["on"]
    recording.legal_hold_reason = reason if body["on"] else None
    session.add(
        LegalHoldEvent(
            recording_id=recording_id, on=body["on"], reason=reason, staff_name=g.staff_name
        )
    )
    session.commit()
    return jsonify(to_json(recording))
