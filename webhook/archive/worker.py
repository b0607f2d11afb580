"""The archive worker: claim a queued recording, stream it into the archive, confirm, mark it."""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import requests
import urllib3.exceptions
from sqlalchemy import Connection, Table, select, update
from sqlalchemy.exc import DBAPIError

from webhook import notices, policy
from webhook.archive.background import OnDemandThread
from webhook.archive.deletion import DELETE_EVERY_SECONDS, delete_from_plivo
from webhook.archive.media import MediaError, RefusedMedia, RefusedURL, media_limits, open_media
from webhook.archive.members import DETAILS_INTERVAL_SECONDS, fill_member_details, poll_members
from webhook.archive.reconcile import reconcile
from webhook.archive.storage import HashingReader, Interrupted, StorageError, StoredObject
from webhook.archive.transcripts import archive_transcripts, transcript_waiting
from webhook.config import archive_prefix
from webhook.db import (
    NOT_MIGRATED,
    UPGRADE_HINT,
    describe_error,
    execute_autocommitted,
    is_schema_missing,
    rowcount,
    transaction,
)
from webhook.errors import BadParameter, PlivoError
from webhook.members import refresh_recording
from webhook.models import Recording, Schedule, Status, utcnow
from webhook.recordings import (
    EPOCH_MS_RANGE,
    MAX_DURATION_MS,
    archive_key,
    insert_ignoring_conflict,
    parse_ms,
)

if TYPE_CHECKING:
    from webhook import Services

log = logging.getLogger(__name__)
# The queue's statements run on the table itself: SQLAlchemy's ORM-enabled UPDATE cost about a
# millisecond of CPU per job.
RECORDINGS: Table = Recording.__table__  # type: ignore[assignment]

# An archived job's columns, as the settle writes them (with lease_token and updated_at).
SETTLED_COLUMNS = (
    "status",
    "archive_key",
    "archive_size",
    "archive_sha256",
    "archive_version_id",
    "archived_at",
    "retain_until",
    "archive_seconds",
)
# `Worker.claim` on PostgreSQL, run as written (psycopg's parameter style): the job just archived
# settled while its lease is still ours, whether a transcript of it waits to go beside the audio,
# and, unless one does, the next due row claimed, skipping rows other workers are claiming (and
# the settled row itself: one statement may not update a row twice), its archive key named if it
# has none, as `archive_key` names it (a test holds the two to the same keys). One round trip,
# one commit: nothing of it is written unless all of it is.
SETTLE_AND_CLAIM = """
WITH settled AS (
    UPDATE recordings SET
        status = %(status)s, archive_key = %(archive_key)s, archive_size = %(archive_size)s,
        archive_sha256 = %(archive_sha256)s, archive_version_id = %(archive_version_id)s,
        archived_at = %(archived_at)s, retain_until = %(retain_until)s,
        archive_seconds = %(archive_seconds)s, last_error = NULL, next_attempt_at = NULL,
        lease_token = NULL, updated_at = %(now)s
    WHERE id = %(settle_id)s AND lease_token = %(settle_token)s
    RETURNING recording_id
), waiting AS (
    SELECT EXISTS (SELECT FROM transcripts t JOIN settled USING (recording_id)
                   WHERE t.archived_at IS NULL AND t.sha256 IS NOT NULL) AS waiting
), due AS (
    SELECT id FROM recordings
    WHERE status IN ('pending', 'archiving') AND next_attempt_at <= %(now)s
      AND id IS DISTINCT FROM %(settle_id)s
    ORDER BY next_attempt_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE recordings r SET
        status = %(archiving)s, lease_token = %(token)s, next_attempt_at = %(lease_until)s,
        attempts = r.attempts + 1, updated_at = %(now)s,
        archive_key = COALESCE(r.archive_key, %(prefix)s || 'recordings/'
            || to_char(to_timestamp(r.start_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY/MM/DD')
            || '/' || r.recording_id || '.' || COALESCE(r.file_format, 'mp3'))
    FROM due
    WHERE r.id = due.id AND NOT (SELECT waiting FROM waiting)
    RETURNING r.id, r.recording_id, r.record_url, r.archive_key, r.file_format, r.attempts,
        r.start_ms, r.end_ms, r.duration_ms
)
SELECT EXISTS (SELECT FROM settled), (SELECT waiting FROM waiting), claimed.*
FROM (SELECT) AS one LEFT JOIN claimed ON TRUE
"""
# What a claim returns of the row, in SETTLE_AND_CLAIM's order: a Job but for its lease token.
CLAIMED_COLUMNS = (
    "id",
    "recording_id",
    "record_url",
    "archive_key",
    "file_format",
    "attempts",
    "start_ms",
    "end_ms",
    "duration_ms",
)


CONTENT_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav"}
MAX_RETRY_DELAY = 6 * 3600.0
# How often a transcript that came after its audio was archived (or failed) is looked for.
TRANSCRIPT_CHORE_SECONDS = 5
CHORES_EVERY_SECONDS = 1.0

# Failures of the media host, the network or the archive: worth another attempt later.
RETRYABLE = (
    MediaError,
    StorageError,
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
)


@dataclass(frozen=True)
class Job:
    """A claimed recording: what the worker needs to archive it, and the lease it holds."""

    id: int
    recording_id: str
    record_url: str | None
    archive_key: str
    file_format: str | None
    lease_token: str
    attempts: int
    start_ms: int
    end_ms: int | None
    duration_ms: int | None


def retry_delay(attempts: int, base: float) -> float:
    """Exponential backoff with jitter: between half and all of base * 2^(attempts-1)."""
    ceiling = min(base * 2.0 ** max(attempts - 1, 0), MAX_RETRY_DELAY)
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not a secret


@dataclass(frozen=True)
class Archived:
    """A job whose recording is in the archive and confirmed: the outcome still to be written."""

    job: Job
    stored: StoredObject
    values: dict[str, object]  # the row's new columns, archive_seconds among them


@dataclass(eq=False)
class Lease:
    """The lease of the job a worker is on: extended while the job runs, `lost` once another
    worker has taken the job over."""

    job: Job
    extended_at: float  # time.monotonic() when it was claimed or last extended
    lost: bool = False


# The lease keeper's thread ends when no job has come for this long; the next job starts another.
KEEPER_IDLE_SECONDS = 1.0


class LeaseKeeper(OnDemandThread):
    """Extends the lease of the job its worker is on, every third of ARCHIVE_LEASE_SECONDS, and
    notices when another worker has taken that job over. One thread does it for job after job of
    a backlog, and ends KEEPER_IDLE_SECONDS after the last."""

    def __init__(self, services: Services) -> None:
        super().__init__("lease-keeper")
        self.services = services
        self.every = services.settings.archive_lease_seconds / 3
        self._current: Lease | None = None

    def keep(self, job: Job) -> Lease:
        """Keep the lease of `job`, just claimed, until `release`."""
        lease = Lease(job, time.monotonic())
        with self._lock:
            self._current = lease
            try:
                if self._wake():
                    self._lock.notify()
            except BaseException:
                self._current = None
                raise
        return lease

    def release(self, lease: Lease) -> None:
        """The job is over (or given up): its lease is no longer extended."""
        with self._lock:
            if self._current is lease:
                self._current = None
                self._lock.notify()  # the thread goes idle now, not when the lease falls due

    def _serve(self) -> None:
        while (lease := self._next_due()) is not None:
            self._extend(lease)

    def _next_due(self) -> Lease | None:
        """The lease to extend, once it is due; None once no job has come for a while."""
        with self._lock:
            while True:
                lease = self._current
                if lease is None or lease.lost:
                    if not self._lock.wait(KEEPER_IDLE_SECONDS) and self._current is lease:
                        self._running = False  # under the lock: a `keep` now starts another
                        return None
                    continue
                now = time.monotonic()
                due = lease.extended_at + self.every
                if now >= due:
                    lease.extended_at = now
                    return lease
                self._lock.wait(due - now)

    def _extend(self, lease: Lease) -> None:
        # Outside the lock: a slow database holds up no job's `keep` or `release`.
        job = lease.job
        seconds = self.services.settings.archive_lease_seconds
        try:
            with self.services.engine.begin() as connection:
                kept = rowcount(
                    connection.execute(
                        update(RECORDINGS)
                        .where(
                            RECORDINGS.c.id == job.id,
                            RECORDINGS.c.lease_token == job.lease_token,
                            RECORDINGS.c.status == Status.ARCHIVING,
                        )
                        .values(next_attempt_at=utcnow() + dt.timedelta(seconds=seconds))
                    )
                )
        except DBAPIError as exc:
            log.warning(
                "lease not extended: %s", exc.orig, extra={"recording_id": job.recording_id}
            )
            return
        except Exception:
            # Tried again a third of a lease later, as when the database does not answer: the
            # thread goes on keeping leases.
            log.exception("lease not extended", extra={"recording_id": job.recording_id})
            return
        if not kept:
            lease.lost = True


class Worker:
    """Archives queued recordings one at a time; run several (processes) to go faster."""

    def __init__(self, services: Services, stop: threading.Event | None = None) -> None:
        self.services = services
        self.settings = services.settings
        self.stop = stop or threading.Event()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.leases = LeaseKeeper(services)

    # --- the queue --------------------------------------------------------------------------

    def claim(self, archived: Archived | None = None) -> Job | None:
        """Atomically take the next due recording (or one whose lease expired), or None; first,
        in the same transaction, write the outcome of the job just `archived` (a backlog then
        costs one commit per recording, not two)."""
        if self.services.on_postgresql:
            settled, job = self._settle_and_claim_in_one_statement(archived)
            transcript_first = settled is not None and settled[1]
        else:
            with self.services.engine.begin() as connection:
                settled = None if archived is None else self._settle_archived(connection, archived)
                # A transcript waiting to go beside that audio goes first, and the next job is
                # claimed after it: no lease runs unattended meanwhile.
                transcript_first = settled is not None and settled[1]
                job = None if transcript_first else self._claim_in(connection)
        if archived is not None and settled is not None:
            self._report_archived(archived, *settled)
        return self.claim() if transcript_first else job

    def _settle_and_claim_in_one_statement(
        self, archived: Archived | None
    ) -> tuple[tuple[bool, bool] | None, Job | None]:
        """`claim` on PostgreSQL: the outcome written, the transcript looked for and the next job
        claimed (its key named, if it has none) in one autocommitted statement."""
        now = utcnow()
        token = str(uuid.uuid4())
        params: dict[str, object] = {
            "now": now,
            "token": token,
            "archiving": Status.ARCHIVING.value,
            "lease_until": now + dt.timedelta(seconds=self.settings.archive_lease_seconds),
            "prefix": archive_prefix(self.settings.archive_url),
            "settle_id": None,
            "settle_token": None,
            **dict.fromkeys(SETTLED_COLUMNS),
        }
        if archived is not None:
            values = {**archived.values, "status": Status.ARCHIVED.value}
            params.update(
                {column: values[column] for column in SETTLED_COLUMNS},
                settle_id=archived.job.id,
                settle_token=archived.job.lease_token,
            )
        marked, waiting, *columns = execute_autocommitted(
            self.services.engine, SETTLE_AND_CLAIM, params
        )
        settled = None if archived is None else (bool(marked), bool(waiting))
        if columns[0] is None:
            return settled, None
        return settled, Job(**dict(zip(CLAIMED_COLUMNS, columns, strict=True)), lease_token=token)

    def _claim_in(self, connection: Connection) -> Job | None:
        now = utcnow()
        due = (
            select(RECORDINGS.c.id)
            .where(
                RECORDINGS.c.status.in_([Status.PENDING, Status.ARCHIVING]),
                RECORDINGS.c.next_attempt_at <= now,
            )
            .order_by(RECORDINGS.c.next_attempt_at)
            .limit(1)
            # Several workers on PostgreSQL each skip the rows another is claiming.
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        token = str(uuid.uuid4())
        row = connection.execute(
            update(RECORDINGS)
            .where(RECORDINGS.c.id == due)
            .values(
                status=Status.ARCHIVING,
                lease_token=token,
                next_attempt_at=now + dt.timedelta(seconds=self.settings.archive_lease_seconds),
                attempts=RECORDINGS.c.attempts + 1,
                updated_at=now,
            )
            .returning(*(RECORDINGS.c[name] for name in CLAIMED_COLUMNS))
        ).one_or_none()
        if row is None:
            return None
        claimed = dict(row._mapping)
        if claimed["archive_key"] is None:
            # The worker that writes the object names it, from its own ARCHIVE_URL, once: later
            # attempts (and rows keyed before this rule) keep the key on the row.
            claimed["archive_key"] = archive_key(
                archive_prefix(self.settings.archive_url),
                row.recording_id,
                row.start_ms,
                row.file_format or "mp3",
            )
            connection.execute(
                update(RECORDINGS)
                .where(RECORDINGS.c.id == row.id)
                .values(archive_key=claimed["archive_key"])
            )
        return Job(**claimed, lease_token=token)

    def _settle(self, job: Job, **values: object) -> bool:
        """Write the outcome, but only while this worker still holds the job's lease."""
        with self.services.engine.begin() as connection:
            return self._settle_in(connection, job, values)

    @staticmethod
    def _settle_in(connection: Connection, job: Job, values: dict[str, object]) -> bool:
        result = connection.execute(
            update(RECORDINGS)
            .where(RECORDINGS.c.id == job.id, RECORDINGS.c.lease_token == job.lease_token)
            .values(lease_token=None, updated_at=utcnow(), **values)
        )
        return rowcount(result) == 1

    def _settle_archived(self, connection: Connection, archived: Archived) -> tuple[bool, bool]:
        """Mark the job archived (if its lease is still ours); and whether a transcript of it
        waits to be archived beside the audio."""
        marked = self._settle_in(connection, archived.job, archived.values)
        waiting = marked and transcript_waiting(connection, archived.job.recording_id)
        return marked, waiting

    def _report_archived(self, archived: Archived, marked: bool, waiting: bool) -> None:
        """After the outcome is committed: the transcript beside the audio, and the log line."""
        if waiting:
            self.archive_transcripts(archived.job.recording_id)
        stored = archived.stored
        log.info(
            "archived" if marked else "archived, but the lease had passed to another worker",
            extra={
                "recording_id": archived.job.recording_id,
                "key": stored.key,
                "size": stored.size,
                "sha256": stored.sha256,
                "seconds": archived.values["archive_seconds"],
            },
        )

    def _fail_or_retry(self, job: Job, error: str, permanent: bool = False) -> None:
        if permanent or job.attempts >= self.settings.archive_max_attempts:
            self._settle(job, status=Status.FAILED, last_error=error, next_attempt_at=None)
            log.error(
                "archive failed",
                extra={"recording_id": job.recording_id, "error": error, "attempts": job.attempts},
            )
            return
        delay = retry_delay(job.attempts, self.settings.archive_retry_base_seconds)
        self._settle(
            job,
            status=Status.PENDING,
            last_error=error,
            next_attempt_at=utcnow() + dt.timedelta(seconds=delay),
        )
        log.warning(
            "archive attempt failed; will retry",
            extra={
                "recording_id": job.recording_id,
                "error": error,
                "attempts": job.attempts,
                "retry_in_s": round(delay, 1),
            },
        )

    # --- one job ----------------------------------------------------------------------------

    def process(self, job: Job) -> None:
        """Archive one claimed recording and record the outcome."""
        archived = self.archive(job)
        if archived is not None:
            self._finish(archived)

    def _finish(self, archived: Archived) -> None:
        with self.services.engine.begin() as connection:
            settled = self._settle_archived(connection, archived)
        self._report_archived(archived, *settled)

    def archive(self, job: Job) -> Archived | None:
        """Archive one claimed recording: what to write when it is in the archive and confirmed
        (the caller writes it); a failure or a give-back is written here (None)."""
        started = time.perf_counter()
        if job.attempts > self.settings.archive_max_attempts:
            # Claimed again after its lease expired on the last attempt: a worker died with it.
            self._fail_or_retry(job, "the worker stopped during the last attempt", permanent=True)
            return None
        if not job.record_url:
            self._fail_or_retry(job, "no record_url known for this recording", permanent=True)
            return None
        lease = self.leases.keep(job)
        try:
            job = self._complete_metadata(job)
            stored = self._copy(job, lambda: self.stop.is_set() or lease.lost)
        except (RefusedURL, RefusedMedia) as exc:
            self._fail_or_retry(job, f"refused: {exc}", permanent=True)
            return None
        except BadParameter as exc:
            self._fail_or_retry(job, f"Plivo's Recording API: {exc.message}", permanent=True)
            return None
        except Interrupted:
            if lease.lost:
                log.warning(
                    "lease lost; leaving the job to its new worker",
                    extra={"recording_id": job.recording_id},
                )
                return None
            # Shutting down: give the job back at once, without counting the attempt.
            self._settle(
                job, status=Status.PENDING, attempts=job.attempts - 1, next_attempt_at=utcnow()
            )
            log.info("released on shutdown", extra={"recording_id": job.recording_id})
            return None
        except RETRYABLE as exc:
            self._fail_or_retry(job, f"{type(exc).__name__}: {exc}"[:2000])
            return None
        except DBAPIError:
            raise  # the outcome cannot be written now: the lease expires and the job is retaken
        except Exception as exc:
            # A bug or an input nobody foresaw: one job must not end the worker. The traceback
            # goes to the log, the job to its retries (then `failed`), and the loop goes on.
            log.exception("unexpected error in job", extra={"recording_id": job.recording_id})
            self._fail_or_retry(job, f"unexpected error: {type(exc).__name__}: {exc}"[:2000])
            return None
        finally:
            self.leases.release(lease)
        values: dict[str, object] = {
            "status": Status.ARCHIVED,
            "archive_key": stored.key,
            "archive_size": stored.size,
            "archive_sha256": stored.sha256,
            "archive_version_id": stored.version_id,
            "archived_at": utcnow(),
            "retain_until": self._retain_until(job),
            "last_error": None,
            "next_attempt_at": None,
            "archive_seconds": round(time.perf_counter() - started, 3),
        }
        return Archived(job, stored, values)

    def _retain_until(self, job: Job) -> dt.datetime | None:
        days = self.settings.retention_days
        if days is None:
            return None
        end_ms = job.end_ms or job.start_ms + (job.duration_ms or 0)
        # S3 keeps retain-until in whole seconds: round up so the lock never ends early.
        end_s = -(-end_ms // 1000)
        return dt.datetime.fromtimestamp(end_s, dt.UTC) + dt.timedelta(days=days)

    def _copy(self, job: Job, interrupted: Callable[[], bool]) -> StoredObject:
        assert job.record_url is not None
        limits = media_limits(job.file_format, job.duration_ms, self.settings)
        with open_media(job.record_url, self.settings, limits, interrupted) as download:
            reader = HashingReader(download.read, interrupted=interrupted)
            return self.services.storage.put(
                job.archive_key,
                reader,
                CONTENT_TYPES.get(job.file_format or "", "application/octet-stream"),
                self._retain_until(job),
                first_attempt=job.attempts == 1,
            )

    def _complete_metadata(self, job: Job) -> Job:
        """Fill durations and times the callback did not carry from Plivo's Recording API."""
        if job.duration_ms is not None and job.end_ms is not None:
            return job
        try:
            details = self.services.plivo.get_recording(job.recording_id)
        except PlivoError as exc:
            log.info(
                "recording details unavailable: %s",
                exc.message,
                extra={"recording_id": job.recording_id},
            )
            return job
        values: dict[str, int] = {}
        for field, column, bounds in (
            ("recording_duration_ms", "duration_ms", (0, MAX_DURATION_MS)),
            ("recording_end_ms", "end_ms", EPOCH_MS_RANGE),
        ):
            # The same parser and bounds as the callback's: a bad value raises BadParameter.
            raw = details.get(field)
            number = parse_ms(field, "" if raw is None else str(raw), 1, bounds)
            if number is not None and getattr(job, column) is None:
                values[column] = number
        if not values:
            return job
        if "duration_ms" in values:
            values["duration_s"] = values["duration_ms"] // 1000
        with transaction(self.services.sessions) as session:
            session.execute(update(Recording).where(Recording.id == job.id).values(**values))
            # Its end now known, the members present while it ran are known better too.
            refresh_recording(session, job.recording_id)
        return Job(**{**job.__dict__, **{k: v for k, v in values.items() if k != "duration_s"}})

    # --- the loop ---------------------------------------------------------------------------

    def _turn_is_ours(self, chore: str, every_seconds: int) -> bool:
        """Claim this turn of a periodic chore, so that of several workers exactly one runs it."""
        now = utcnow()
        later = now + dt.timedelta(seconds=every_seconds)
        with transaction(self.services.sessions) as session:
            if insert_ignoring_conflict(session, Schedule, {"name": chore, "next_run_at": later}):
                return True
            claimed = session.execute(
                update(Schedule)
                .where(Schedule.name == chore, Schedule.next_run_at <= now)
                .values(next_run_at=later)
            )
            return rowcount(claimed) == 1

    def reconcile_recent(self) -> None:
        """Queue recordings of the last two intervals whose callbacks never came."""
        every = self.settings.reconcile_interval_seconds
        since = utcnow() - dt.timedelta(seconds=2 * every)
        try:
            result = reconcile(self.services, since)
        except PlivoError as exc:
            log.warning("reconcile failed: %s", exc.message)
            return
        log.info(result.summary(), extra={"queued": result.queued, "seen": result.seen})

    def archive_transcripts(self, recording_id: str | None = None) -> None:
        """Archive transcripts beside their archived audio; a failure never reaches the audio."""
        try:
            archived = archive_transcripts(self.services, recording_id)
        except RETRYABLE as exc:
            log.warning("transcripts not archived: %s", exc, extra={"recording_id": recording_id})
            return
        except DBAPIError as exc:
            log.warning("transcripts not archived: %s", exc.orig)
            return
        if archived and recording_id is None:
            log.info("transcripts archived", extra={"count": archived})

    def _chores(self) -> None:
        every = self.settings.reconcile_interval_seconds
        plivo_configured = self.settings.plivo_auth_id and self.settings.plivo_auth_token
        if every and plivo_configured and self._turn_is_ours("reconcile", every):
            self.reconcile_recent()
        every = self.settings.auto_record_interval_seconds
        if (
            self.settings.auto_record
            and plivo_configured
            and self._turn_is_ours("auto-record", every)
        ):
            self.auto_record()
        deleting = self.settings.delete_from_plivo_after_days is not None and plivo_configured
        if deleting and self._turn_is_ours("delete-from-plivo", DELETE_EVERY_SECONDS):
            self.delete_from_plivo()
        if self._turn_is_ours("transcripts", TRANSCRIPT_CHORE_SECONDS):
            self.archive_transcripts()
        poll = self.settings.member_poll_seconds
        if poll and plivo_configured and self._turn_is_ours("member_poll", poll):
            poll_members(self.services)
        if plivo_configured and self._turn_is_ours("member_details", DETAILS_INTERVAL_SECONDS):
            fill_member_details(self.services)
        noticing = notices.notice_configured(self.services) and plivo_configured
        if noticing and self._turn_is_ours("notify-entered", notices.NOTIFY_ENTERED_EVERY_SECONDS):
            notices.notify_entered(self.services)

    def run(self, once: bool = False, poll_seconds: float = 1.0) -> int:
        """Archive until stopped (with `once`: until nothing is due); answer how many jobs ran.

        A long-running worker also does the periodic chores: every RECONCILE_INTERVAL_SECONDS,
        queueing recent recordings whose callbacks were lost.
        """
        done = 0
        db_failures = 0
        chores_due = 0.0
        # A job archived and confirmed, its outcome written with the next claim.
        archived: Archived | None = None
        try:
            while not self.stop.is_set():
                try:
                    # Chores claim their turns in the database: look at most once a second, not
                    # between every two jobs of a backlog.
                    if not once and time.monotonic() >= chores_due:
                        if archived is not None:
                            self._finish(archived)  # not kept waiting behind the chores
                            archived = None
                        chores_due = time.monotonic() + CHORES_EVERY_SECONDS
                        self._chores()
                    job = self.claim(archived)
                    archived = None
                    db_failures = 0
                except DBAPIError as exc:
                    db_failures += 1
                    if is_schema_missing(exc):
                        # Retried too: the release phase may be migrating right now.
                        log.error(
                            "%s; %s",
                            NOT_MIGRATED,
                            UPGRADE_HINT,
                            extra={"error": describe_error(exc)},
                        )
                    else:
                        log.warning("database unavailable: %s", exc.orig)
                    if once and db_failures >= 5:
                        raise
                    self.stop.wait(min(2.0**db_failures, 30.0))
                    continue
                if job is None:
                    if once:
                        # Also the transcripts that came after their audio was archived.
                        self.archive_transcripts()
                        break
                    self.stop.wait(poll_seconds)
                    continue
                try:
                    archived = self.archive(job)
                except DBAPIError as exc:
                    # The outcome could not be written: the lease expires, the job is taken again.
                    log.warning(
                        "database unavailable while finishing a job: %s",
                        exc.orig,
                        extra={"recording_id": job.recording_id},
                    )
                done += 1
        finally:
            if archived is not None:
                try:
                    self._finish(archived)
                except DBAPIError as exc:
                    # Its lease expires and another attempt archives it again (same key).
                    log.warning(
                        "database unavailable while finishing a job: %s",
                        exc.orig,
                        extra={"recording_id": archived.job.recording_id},
                    )
        return done

    # --- policy chores ----------------------------------------------------------------------

    def auto_record(self) -> None:
        """Start recordings of live conferences that AUTO_RECORD names and nobody records."""
        try:
            result = policy.auto_record(self.services)
        except PlivoError as exc:
            log.warning("auto-record could not list conferences: %s", exc.message)
            return
        if result.started or result.failed:
            log.info(
                "auto-record: %d started, %d failed",
                result.started,
                result.failed,
                extra={"live": result.live, "matching": result.matching},
            )

    def delete_from_plivo(self) -> None:
        """Delete from Plivo what the archive is proven to hold, once DELETE_FROM_PLIVO_AFTER_DAYS
        have passed."""
        try:
            result = delete_from_plivo(self.services)
        except RETRYABLE as exc:
            # The archive or the network failed mid-pass: what is left is taken up next turn.
            log.warning("delete from Plivo interrupted: %s: %s", type(exc).__name__, exc)
            return
        if result.deleted or result.failed or result.refused or result.mismatched:
            log.info(
                "delete from Plivo: %d deleted, %d failed, %d refused, %d mismatched",
                result.deleted,
                result.failed,
                result.refused,
                result.mismatched,
            )
