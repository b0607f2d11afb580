"""What staff do with recordings, whichever door they come through (the JSON API or the console):
find one, play it, place or lift a legal hold, requeue a failed one."""

from __future__ import annotations

import logging

from flask import Response, current_app, redirect, stream_with_context
from sqlalchemy.exc import DBAPIError
from werkzeug.wrappers import Response as BaseResponse

from webhook import services
from webhook.archive.storage import Storage, StorageError, Unsupported
from webhook.audit import note_recordings
from webhook.db import request_session
from webhook.edge import check_recording_id, check_text
from webhook.errors import APIError, BadParameter
from webhook.models import LegalHoldEvent, Recording, Status
from webhook.recordings import find, lock_recording, requeue

MAX_REASON = 2000
log = logging.getLogger(__name__)


def get_recording(recording_id: str) -> Recording:
    """The recording, noted in the audit log; 404 when there is none."""
    note_recordings(check_recording_id(recording_id))
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


def check_legal_hold_reason(on: bool, reason: object) -> str | None:
    """The reason, validated: text of at most 2000 characters, required to place a hold."""
    checked = check_text("reason", reason, MAX_REASON, multiline=True)
    if on and not (checked or "").strip():
        raise BadParameter("reason", "a reason is required to place a legal hold")
    return checked


def set_legal_hold(recording_id: str, on: bool, reason: object, staff_name: str) -> Recording:
    """Place or lift a legal hold on the S3 object (Object Lock) and in the database, together,
    with the event in the append-only history; committed.

    Everything is validated before S3 is asked. The recording's row stays locked from before the
    S3 call until the commit, so concurrent changes apply one after the other, and a failure on
    either side puts S3 back as the row says: S3, the row and its history always agree.
    """
    checked = check_legal_hold_reason(on, reason)
    note_recordings(check_recording_id(recording_id))
    session = request_session()
    recording = lock_recording(session, recording_id)
    if recording is None:
        raise APIError(404, "recording_not_found", f"No recording {recording_id!r}")
    key = _archived(recording)
    # The transcript archived beside the audio is held (or released) with it.
    objects = [(key, recording.archive_version_id)]
    transcript = recording.transcript
    if transcript is not None and transcript.archive_key and transcript.archived_at:
        objects.append((transcript.archive_key, transcript.archive_version_id))
    held = recording.legal_hold
    recording.legal_hold = on
    recording.legal_hold_reason = checked if on else None
    session.add(
        LegalHoldEvent(recording_id=recording_id, on=on, reason=checked, staff_name=staff_name)
    )
    session.flush()  # a database refusal surfaces here, before S3 is changed
    storage = services(current_app).storage
    try:
        for object_key, version_id in objects:
            storage.set_legal_hold(object_key, version_id, on)
    except Unsupported as exc:
        session.rollback()
        raise APIError(502, "legal_hold_failed", str(exc)) from None
    except StorageError as exc:
        session.rollback()
        # S3 may have applied the change and failed to say so (a timeout).
        _restore_legal_hold(storage, recording_id, objects, held, exc)
        raise APIError(
            502, "legal_hold_failed", "S3 did not confirm the legal hold; nothing was changed"
        ) from None
    try:
        session.commit()
    except DBAPIError as exc:
        _restore_legal_hold(storage, recording_id, objects, held, exc)
        raise
    return recording


def _restore_legal_hold(
    storage: Storage,
    recording_id: str,
    objects: list[tuple[str, str | None]],
    held: bool,
    cause: Exception,
) -> None:
    """Put S3's legal hold back to what the database keeps, after a change that failed."""
    log.warning(
        "legal hold not changed",
        extra={"recording_id": recording_id, "error": type(cause).__name__},
    )
    try:
        for key, version_id in objects:
            storage.set_legal_hold(key, version_id, held)
    except StorageError:
        log.error(
            "legal hold in S3 may differ from the database; set it again",
            extra={"recording_id": recording_id, "legal_hold": held},
        )


def requeue_recording(recording_id: str) -> None:
    """Put one failed (or pending) recording back on the archive queue now; committed."""
    recording = get_recording(recording_id)
    session = request_session()
    if not requeue(session, Recording.id == recording.id):
        raise APIError(
            409, "not_requeueable", f"Recording {recording_id} is {recording.status}, not failed"
        )
    session.commit()
