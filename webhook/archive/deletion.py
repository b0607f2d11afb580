"""Deleting recordings from Plivo once the archive is proven to hold them.

A recording is deleted from Plivo only when its archived object has just been re-read and matched
its SHA-256 and size, the Object Lock retention is in place when retention is configured, and the
configured days have passed since it ended. A mismatch is never deleted and is reported.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from webhook.archive.storage import StorageError, check_object
from webhook.db import transaction
from webhook.errors import PlivoError
from webhook.models import PlivoDeletion, Recording, Status, utcnow

if TYPE_CHECKING:
    from webhook import Services

log = logging.getLogger(__name__)

# Often enough that a recording goes within a minute of becoming eligible.
DELETE_EVERY_SECONDS = 30
BATCH = 50
# A recording whose deletion failed, or was refused for now, waits this long before a retry.
RETRY_SECONDS = 300

DELETED = "deleted"
FAILED = "failed"  # Plivo did not delete it: tried again later
REFUSED = "refused"  # not safe yet (archive unreadable, lock missing): checked again later
MISMATCH = "mismatch"  # the archived bytes differ from what is on file: never deleted


@dataclass
class Deletions:
    """What one pass did."""

    deleted: int = 0
    failed: int = 0
    refused: int = 0
    mismatched: int = 0


def _log(svc: Services, recording_id: str, outcome: str, error: str | None = None) -> None:
    with transaction(svc.sessions) as session:
        session.add(PlivoDeletion(recording_id=recording_id, outcome=outcome, error=error))
    log.log(
        logging.INFO if outcome == DELETED else logging.WARNING,
        "delete from Plivo: %s",
        outcome,
        extra={"recording_id": recording_id, "outcome": outcome, "error": error},
    )


def _due(svc: Services, now: dt.datetime) -> list[Recording]:
    """Archived recordings past the configured days, not deleted, not mismatched, not waiting."""
    days = svc.settings.delete_from_plivo_after_days
    assert days is not None
    cutoff_ms = int((now - dt.timedelta(days=days)).timestamp() * 1000)
    query = (
        select(Recording)
        .where(
            Recording.status == Status.ARCHIVED,
            Recording.plivo_deleted_at.is_(None),
            Recording.archive_mismatch.is_(None),
            or_(
                Recording.end_ms <= cutoff_ms,
                and_(
                    Recording.end_ms.is_(None),
                    Recording.start_ms + Recording.duration_ms <= cutoff_ms,
                ),
            ),
            ~exists().where(
                PlivoDeletion.recording_id == Recording.recording_id,
                PlivoDeletion.at > now - dt.timedelta(seconds=RETRY_SECONDS),
            ),
        )
        .order_by(Recording.end_ms)
        .limit(BATCH)
    )
    if svc.settings.retention_days is not None:
        query = query.where(Recording.retain_until > now)
    with svc.sessions() as session:
        return list(session.scalars(query))


def _safe_to_delete(svc: Services, recording: Recording, now: dt.datetime) -> str | None:
    """Re-read the archived object and check its lock: None when safe, else the outcome."""
    key = str(recording.archive_key)
    try:
        problem = check_object(
            svc.storage,
            key,
            recording.archive_version_id,
            recording.archive_size,
            recording.archive_sha256,
        )
        retained = (
            svc.storage.retained_until(key, recording.archive_version_id)
            if svc.settings.retention_days is not None
            else None
        )
    except StorageError as exc:
        _log(svc, recording.recording_id, REFUSED, f"archive not readable: {exc}"[:2000])
        return REFUSED
    if problem is not None:
        message = f"archived object {key} does not match: {problem}"
        with transaction(svc.sessions) as session:
            session.execute(
                update(Recording)
                .where(Recording.id == recording.id)
                .values(archive_mismatch=message, updated_at=now)
            )
        _log(svc, recording.recording_id, MISMATCH, message)
        return MISMATCH
    if svc.settings.retention_days is not None and (retained is None or retained <= now):
        _log(svc, recording.recording_id, REFUSED, f"no Object Lock retention in place on {key}")
        return REFUSED
    return None


def delete_from_plivo(svc: Services) -> Deletions:
    """Delete from Plivo the recordings that are due and proven safe in the archive."""
    result = Deletions()
    if svc.settings.delete_from_plivo_after_days is None:
        return result
    now = utcnow()
    for recording in _due(svc, now):
        verdict = _safe_to_delete(svc, recording, now)
        if verdict == MISMATCH:
            result.mismatched += 1
            continue
        if verdict == REFUSED:
            result.refused += 1
            continue
        note = None
        try:
            svc.plivo.delete_recording(recording.recording_id)
        except PlivoError as exc:
            if exc.status != 404:
                result.failed += 1
                _log(svc, recording.recording_id, FAILED, exc.message[:2000])
                continue
            note = "Plivo no longer had it"
        with transaction(svc.sessions) as session:
            session.execute(
                update(Recording)
                .where(Recording.id == recording.id)
                .values(plivo_deleted_at=utcnow(), updated_at=utcnow())
            )
        _log(svc, recording.recording_id, DELETED, note)
        result.deleted += 1
    return result


def deletion_history(session: Session, recording_id: str) -> list[dict[str, Any]]:
    """Every deletion from Plivo tried, done or refused for this recording, oldest first."""
    rows = session.scalars(
        select(PlivoDeletion)
        .where(PlivoDeletion.recording_id == recording_id)
        .order_by(PlivoDeletion.id)
    )
    return [
        {
            "at": r.at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "outcome": r.outcome,
            "error": r.error,
        }
        for r in rows
    ]
