"""Transcripts into the archive beside their audio, and transcripts got from Plivo later.

A transcript is archived once its recording's audio is: right after the audio by the worker
that archived it, or by the `transcripts` chore for one that arrived later or failed. Writing a
transcript never touches the audio's row, so its failure cannot fail or delay the audio.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, Connection, Table, func, or_, select, update
from sqlalchemy.orm import undefer

from webhook.archive.storage import HashingReader, StorageError
from webhook.db import rowcount, transaction
from webhook.errors import BadParameter, PlivoError
from webhook.models import Recording, Status, Transcript, utcnow
from webhook.transcripts import (
    ORDERED,
    mark_ordered,
    parse_transcription,
    store_report,
    transcript_document,
    transcription_url,
)

if TYPE_CHECKING:
    from webhook import Services

log = logging.getLogger(__name__)

SUFFIX = ".transcript.json"
CONTENT_TYPE = "application/json; charset=utf-8"
BATCH = 50
CLAIM_SECONDS = 300
RETRY_BASE_SECONDS = 30.0
MAX_RETRY_SECONDS = 6 * 3600.0
PAGE = 500


def transcript_key(audio_key: str) -> str:
    """Where a transcript is archived: beside its audio, the same key stem."""
    stem, _ = posixpath.splitext(audio_key)
    return stem + SUFFIX


@dataclass(frozen=True)
class _Due:
    id: int
    recording_id: str
    audio_key: str
    retain_until: dt.datetime | None
    legal_hold: bool


def transcript_waiting(connection: Connection, recording_id: str) -> bool:
    """Whether the recording has a transcript not yet archived beside its audio."""
    table: Table = Transcript.__table__  # type: ignore[assignment]  # Core: no ORM overhead
    waiting = select(table.c.id).where(
        table.c.recording_id == recording_id,
        table.c.archived_at.is_(None),
        table.c.sha256.is_not(None),
    )
    return bool(connection.execute(select(waiting.exists())).scalar_one())


def archive_transcripts(services: Services, recording_id: str | None = None) -> int:
    """Archive transcripts whose audio is archived (one recording's, or a batch of any); the
    number archived. A failure is kept on the transcript's row and retried later."""
    now = utcnow()
    query = (
        select(
            Transcript.id,
            Transcript.recording_id,
            Recording.archive_key,
            Recording.retain_until,
            Recording.legal_hold,
        )
        .join(Recording, Recording.recording_id == Transcript.recording_id)
        .where(
            Transcript.archived_at.is_(None),
            Transcript.sha256.is_not(None),
            Recording.status == Status.ARCHIVED,
            Recording.archive_key.is_not(None),
            or_(
                Transcript.archive_next_attempt_at.is_(None),
                Transcript.archive_next_attempt_at <= now,
            ),
        )
        .order_by(Transcript.id)
        .limit(BATCH)
    )
    if recording_id is not None:
        query = query.where(Transcript.recording_id == recording_id)
    with transaction(services.sessions) as session:
        due = [
            _Due(row.id, row.recording_id, str(row.archive_key), row.retain_until, row.legal_hold)
            for row in session.execute(query)
        ]
    return sum(_archive_one(services, item) for item in due)


def _claim(services: Services, item: _Due) -> bool:
    now = utcnow()
    with transaction(services.sessions) as session:
        claimed = session.execute(
            update(Transcript)
            .where(
                Transcript.id == item.id,
                Transcript.archived_at.is_(None),
                or_(
                    Transcript.archive_next_attempt_at.is_(None),
                    Transcript.archive_next_attempt_at <= now,
                ),
            )
            .values(
                archive_next_attempt_at=now + dt.timedelta(seconds=CLAIM_SECONDS),
                archive_attempts=Transcript.archive_attempts + 1,
            )
        )
        return rowcount(claimed) == 1


def _archive_one(services: Services, item: _Due) -> bool:
    if not _claim(services, item):
        return False  # another worker has it
    key = transcript_key(item.audio_key)
    with transaction(services.sessions) as session:
        transcript = session.scalars(
            select(Transcript).where(Transcript.id == item.id).options(undefer(Transcript.text))
        ).one()
        body = transcript_document(transcript)
        expected, attempts = transcript.sha256, transcript.archive_attempts
    reader = HashingReader(io.BytesIO(body).read)
    try:
        if hashlib.sha256(body).hexdigest() != expected:
            raise StorageError("the transcript no longer matches the SHA-256 on file")
        stored = services.storage.put(key, reader, CONTENT_TYPE, item.retain_until)
        if item.legal_hold:
            services.storage.set_legal_hold(key, stored.version_id, True)
    except (StorageError, OSError) as exc:
        delay = min(RETRY_BASE_SECONDS * 2.0 ** max(attempts - 1, 0), MAX_RETRY_SECONDS)
        with transaction(services.sessions) as session:
            session.execute(
                update(Transcript)
                .where(Transcript.id == item.id)
                .values(
                    archive_error=f"{type(exc).__name__}: {exc}"[:2000],
                    archive_next_attempt_at=utcnow() + dt.timedelta(seconds=delay),
                )
            )
        log.warning(
            "transcript not archived; will retry",
            extra={"recording_id": item.recording_id, "error": str(exc), "retry_in_s": delay},
        )
        return False
    with transaction(services.sessions) as session:
        session.execute(
            update(Transcript)
            .where(Transcript.id == item.id)
            .values(
                archive_key=stored.key,
                archive_size=stored.size,
                archive_version_id=stored.version_id,
                archived_at=utcnow(),
                archive_error=None,
                archive_next_attempt_at=None,
            )
        )
        held_now = session.scalar(
            select(Recording.legal_hold).where(Recording.recording_id == item.recording_id)
        )
    if held_now and not item.legal_hold:
        # A hold placed on the recording while this transcript was being written: it saw no
        # archived transcript to hold, so the hold is placed here.
        try:
            services.storage.set_legal_hold(key, stored.version_id, True)
        except StorageError as exc:
            log.error(
                "legal hold on the transcript failed: %s",
                exc,
                extra={"recording_id": item.recording_id},
            )
    log.info(
        "transcript archived",
        extra={"recording_id": item.recording_id, "key": stored.key, "sha256": stored.sha256},
    )
    return True


# --- getting transcripts from Plivo later ------------------------------------------------------


@dataclass
class TranscriptRun:
    """What `transcripts fetch` or `transcripts order` did."""

    action: str
    seen: int = 0
    done: int = 0
    none: int = 0
    failed: int = 0

    def summary(self) -> str:
        none = "none at Plivo" if self.action == "fetched" else "skipped"
        return (
            f"transcripts: {self.seen} recording(s) looked at, {self.done} {self.action}, "
            f"{self.none} {none}, {self.failed} failed"
        )


def _lacking(since_ms: int | None, ordered_too: bool) -> ColumnElement[bool]:
    """Recordings with no transcript (or, with `ordered_too`, only an ordered one)."""
    had = select(Transcript.recording_id).where(
        Transcript.status != ORDERED if ordered_too else Transcript.id.is_not(None)
    )
    condition: ColumnElement[bool] = Recording.recording_id.not_in(had)
    if since_ms is not None:
        condition = condition & (Recording.start_ms >= since_ms)
    return condition


def count_lacking(services: Services, since_ms: int | None, ordered_too: bool) -> int:
    """How many finished recordings lack a transcript."""
    with transaction(services.sessions) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Recording)
                .where(
                    _lacking(since_ms, ordered_too),
                    Recording.status.in_(_finished(ordered_too)),
                )
            )
            or 0
        )


def _finished(ordered_too: bool) -> list[Status]:
    # Fetch looks at every finished recording; ordering only archived ones (Plivo still has
    # the audio of a recording the archive is working on, but nothing is ordered twice).
    if ordered_too:
        return [Status.PENDING, Status.ARCHIVING, Status.ARCHIVED, Status.FAILED]
    return [Status.ARCHIVED]


def _pages(services: Services, since_ms: int | None, ordered_too: bool) -> Iterator[str]:
    """Recording ids lacking a transcript, a page at a time (keyset on id)."""
    after = 0
    while True:
        with transaction(services.sessions) as session:
            page = session.execute(
                select(Recording.id, Recording.recording_id)
                .where(
                    _lacking(since_ms, ordered_too),
                    Recording.status.in_(_finished(ordered_too)),
                    Recording.id > after,
                )
                .order_by(Recording.id)
                .limit(PAGE)
            ).all()
        if not page:
            return
        yield from (recording_id for _, recording_id in page)
        after = page[-1][0]


def fetch_transcripts(
    services: Services,
    since_ms: int | None,
    progress: Callable[[], None] = lambda: None,
    warn: Callable[[str], None] = lambda _line: None,
) -> TranscriptRun:
    """Read from Plivo's Transcription API the transcripts of recordings that lack one."""
    run = TranscriptRun("fetched")
    plivo = services.plivo
    for recording_id in _pages(services, since_ms, ordered_too=True):
        run.seen += 1
        try:
            answer = plivo.get_transcription(recording_id)
        except PlivoError as exc:
            if exc.status == 404:
                run.none += 1
            elif exc.code == "plivo_auth":
                raise
            else:
                run.failed += 1
                warn(f"{recording_id}: {exc.message}")
            progress()
            continue
        stored = _store_answer(services, recording_id, answer, warn)
        if stored is None:
            run.none += 1
        elif stored:
            run.done += 1
        else:
            run.failed += 1
        progress()
    return run


def _store_answer(
    services: Services, recording_id: str, answer: dict[str, object], warn: Callable[[str], None]
) -> bool | None:
    """Store a Transcription API answer; None when Plivo has no transcript yet."""
    status = str(answer.get("status") or "").lower()
    text = answer.get("transcription")
    error = answer.get("error")
    if not error and (text is None or status in ("in-progress", "in_progress", "pending")):
        return None
    duration_ms = answer.get("recording_duration_ms")
    fields = {
        "recording_id": recording_id,
        "transcription": "" if text is None else str(text),
        "error": "" if not error else str(error),
        "transcription_charge": str(answer.get("cost") or ""),
        "transcription_rate": str(answer.get("rate") or ""),
        "duration": "" if duration_ms in (None, "") else str(float(str(duration_ms)) / 1000),
    }
    try:
        report = parse_transcription(fields)
    except (BadParameter, ValueError) as exc:
        warn(f"{recording_id}: Plivo's transcript is unusable: {exc}")
        return False
    with transaction(services.sessions) as session:
        store_report(session, report, source="api")
    return True


def order_transcripts(
    services: Services,
    since_ms: int | None,
    progress: Callable[[], None] = lambda: None,
    warn: Callable[[str], None] = lambda _line: None,
) -> TranscriptRun:
    """Ask Plivo to transcribe archived recordings that have no transcript (charged)."""
    public_url = services.settings.public_url
    if not public_url:
        raise PlivoError(503, "public_url_not_set", "PUBLIC_URL must be set so Plivo can call back")
    run = TranscriptRun("ordered")
    plivo = services.plivo
    callback = transcription_url(public_url)
    for recording_id in _pages(services, since_ms, ordered_too=False):
        run.seen += 1
        try:
            plivo.order_transcription(recording_id, callback)
        except PlivoError as exc:
            if exc.code == "plivo_auth":
                raise
            run.failed += 1
            warn(f"{recording_id}: {exc.message}")
            progress()
            continue
        with transaction(services.sessions) as session:
            # Noted, so that a second run does not order (and pay for) it again.
            mark_ordered(session, recording_id)
        run.done += 1
        progress()
    return run
