"""What staff do with recordings, whichever door they come through (the JSON API or the console):
find one, play it, place or lift a legal hold, requeue a failed one."""

from __future__ import annotations

from flask import Response, current_app, redirect, stream_with_context
from werkzeug.wrappers import Response as BaseResponse

from webhook import services
from webhook.archive.storage import StorageError
from webhook.audit import note_recordings
from webhook.db import request_session
from webhook.errors import APIError, BadParameter
from webhook.models import LegalHoldEvent, Recording, Status
from webhook.recordings import find, requeue

MAX_REASON = 2000


def get_recording(recording_id: str) -> Recording:
    """The recording, noted in the audit log; 404 when there is none."""
    note_recordings(recording_id)
    recording = find(request_session(), recording_id)
    if recording is None:
        raise APIError(404, "recording_not_found", f"No recording {recording_id!r}")
    return recording


def _archived(recording: Recording) -> str:
    if recording.status != Status.ARCHIVED or not recording.archive_key:
        raise APIError(
            409,
            "not_archived",
            f"Recording {recording.recording_id} is {recording.status}, not archived yet",
        )
    return recording.archive_key


def audio_response(recording: Recording) -> BaseResponse:
    """The audio: a 302 to a short-lived presigned S3 link, or the bytes from a local archive."""
    key = _archived(recording)
    svc = services(current_app)
    url = svc.storage.presigned_url(key, recording.archive_version_id, svc.settings.presign_seconds)
    if url is not None:
        moved = redirect(url, 302)
        moved.headers["Cache-Control"] = "no-store"
        return moved
    mimetype = "audio/mpeg" if recording.file_format == "mp3" else "audio/wav"
    response = Response(stream_with_context(svc.storage.read(key)), mimetype=mimetype)
    response.headers["Content-Length"] = str(recording.archive_size)
    response.headers["Content-Disposition"] = (
        f'attachment; filename="{recording.recording_id}.{recording.file_format}"'
    )
    response.headers["Digest"] = f"sha-256={recording.archive_sha256}"
    response.headers["Cache-Control"] = "no-store"
    return response


def check_legal_hold_reason(on: bool, reason: str | None) -> str | None:
    """The reason, validated: at most 2000 characters, required to place a hold."""
    if reason is not None and len(reason) > MAX_REASON:
        raise BadParameter("reason", f"reason must be a string of at most {MAX_REASON} characters")
    if on and not (reason or "").strip():
        raise BadParameter("reason", "a reason is required to place a legal hold")
    return reason


def set_legal_hold(recording_id: str, on: bool, reason: str | None, staff_name: str) -> Recording:
    """Place or lift a legal hold on the S3 object (Object Lock) and in the database, with the
    event in the append-only history; committed."""
    reason = check_legal_hold_reason(on, reason)
    recording = get_recording(recording_id)
    if recording.status != Status.ARCHIVED or not recording.archive_key:
        raise APIError(409, "not_archived", f"Recording {recording_id} is not archived yet")
    try:
        services(current_app).storage.set_legal_hold(
            recording.archive_key, recording.archive_version_id, on
        )
    except StorageError as exc:
        raise APIError(502, "legal_hold_failed", str(exc)) from None
    session = request_session()
    recording.legal_hold = on
    recording.legal_hold_reason = reason if on else None
    session.add(
        LegalHoldEvent(recording_id=recording_id, on=on, reason=reason, staff_name=staff_name)
    )
    session.commit()
    return recording


def requeue_recording(recording_id: str) -> None:
    """Put one failed (or pending) recording back on the archive queue now; committed."""
    recording = get_recording(recording_id)
    session = request_session()
    if not requeue(session, Recording.id == recording.id):
        raise APIError(
            409, "not_requeueable", f"Recording {recording_id} is {recording.status}, not failed"
        )
    session.commit()
