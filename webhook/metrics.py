"""`GET /metrics` (Prometheus text, behind METRICS_TOKEN), and the count of refused callbacks.

Every number is read from the database at scrape time, so the answer is the same whichever
gunicorn worker or dyno serves the scrape, and it counts the work of every worker process.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from flask import Blueprint, Flask, Response, current_app, request
from sqlalchemy import Table, case, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError

from webhook import notices, services
from webhook.archive import deletion
from webhook.auth import bearer_token
from webhook.db import describe_error
from webhook.errors import APIError
from webhook.models import (
    CallbackLog,
    CallbackRefusal,
    PlivoDeletion,
    Recording,
    RecordingNotice,
    Status,
    utcnow,
)

if TYPE_CHECKING:
    from prometheus_client import Metric
    from prometheus_client.registry import Collector
    from sqlalchemy import Engine

bp = Blueprint("metrics", __name__)
log = logging.getLogger(__name__)
REFUSALS: Table = CallbackRefusal.__table__  # type: ignore[assignment]  # a Table for Core
ARCHIVE_SECONDS_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
CALLBACK_PATH_PREFIX = "/plivo/"
WAITING = (Status.PENDING, Status.ARCHIVING)
# The kinds of callback the door logs; each is shown (at 0) before its first one arrives.
CALLBACK_KINDS = ("member", "recording", "transcription")
NOTICE_OUTCOMES = (notices.PLAYED, notices.FAILED)
DELETION_OUTCOMES = (deletion.DELETED, deletion.FAILED, deletion.REFUSED, deletion.MISMATCH)


@bp.get("/metrics")
def metrics() -> Response:
    """The service's metrics in Prometheus text format (404 unless METRICS_TOKEN is set)."""
    token = services(current_app).settings.metrics_token
    if token is None:
        raise APIError(404, "not_found", "Metrics are off; set METRICS_TOKEN to turn them on")
    given = bearer_token()
    if given is None or not hmac.compare_digest(
        given.encode("utf-8", "replace"), token.encode("utf-8")
    ):
        raise APIError(401, "unauthorized", "An Authorization: Bearer $METRICS_TOKEN is required")
    # Imported here: only scrapes need it, and it would slow every process's start.
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(cast("Collector", DatabaseCollector(services(current_app).engine)))
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


class DatabaseCollector:
    """Recordings, archive lag and callbacks, as the database has them now (a prometheus_client
    collector: it has `collect`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        with self.engine.connect() as connection:
            by_status = connection.execute(
                select(
                    Recording.status,
                    func.count(),
                    func.coalesce(func.sum(Recording.attempts), 0),
                    func.coalesce(func.sum(case((Recording.attempts > 0, 1), else_=0)), 0),
                    func.coalesce(func.sum(Recording.archive_size), 0),
                    func.coalesce(func.sum(Recording.archive_seconds), 0.0),
                    func.count(Recording.archive_seconds),
                    *(
                        func.coalesce(
                            func.sum(case((Recording.archive_seconds <= le, 1), else_=0)), 0
                        )
                        for le in ARCHIVE_SECONDS_BUCKETS
                    ),
                ).group_by(Recording.status)
            ).all()
            # Waiting since the recording ended (the callback), or since the row was made.
            oldest_end_ms, oldest_created = connection.execute(
                select(
                    select(func.min(Recording.end_ms))
                    .where(Recording.status.in_(WAITING), Recording.end_ms.is_not(None))
                    .scalar_subquery(),
                    select(func.min(Recording.created_at))
                    .where(Recording.status.in_(WAITING), Recording.end_ms.is_(None))
                    .scalar_subquery(),
                )
            ).one()
            logged = connection.execute(
                select(CallbackLog.kind, CallbackLog.duplicate, func.count()).group_by(
                    CallbackLog.kind, CallbackLog.duplicate
                )
            ).all()
            refused = connection.execute(
                select(CallbackRefusal.reason, func.sum(CallbackRefusal.count)).group_by(
                    CallbackRefusal.reason
                )
            ).all()
            mismatched = connection.scalar(select(func.count(Recording.archive_mismatch)))
            notice_rows = connection.execute(
                select(RecordingNotice.outcome, func.count()).group_by(RecordingNotice.outcome)
            ).all()
            deletion_rows = connection.execute(
                select(PlivoDeletion.outcome, func.count()).group_by(PlivoDeletion.outcome)
            ).all()
        yield from _recording_metrics(by_status)
        yield _lag(oldest_end_ms, oldest_created)
        yield from _policy_metrics(int(mismatched or 0), notice_rows, deletion_rows)
        callbacks = CounterMetricFamily(
            "webhook_callbacks",
            "Callbacks received from Plivo, by outcome (accepted, duplicate, refused), the kind "
            "of an accepted one (recording, member event) and the reason a refused one was "
            "refused (refused before its kind is known)",
            labels=["outcome", "kind", "reason"],
        )
        counts = {(str(kind), bool(duplicate)): int(n) for kind, duplicate, n in logged}
        for kind in sorted({*CALLBACK_KINDS, *(k for k, _ in counts)}):
            callbacks.add_metric(["accepted", kind, ""], counts.get((kind, False), 0))
            callbacks.add_metric(["duplicate", kind, ""], counts.get((kind, True), 0))
        for reason, n in refused:
            callbacks.add_metric(["refused", "", str(reason)], int(n or 0))
        yield callbacks


def _recording_metrics(rows: Sequence[Sequence[Any]]) -> Iterator[Metric]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    recordings = GaugeMetricFamily("webhook_recordings", "Recordings by state", labels=["status"])
    attempts = GaugeMetricFamily(
        "webhook_recording_attempts",
        "Archive attempts made so far by the recordings in each state",
        labels=["status"],
    )
    seen = {str(row[0]): row for row in rows}
    for status in Status:
        row = seen.get(status.value)
        recordings.add_metric([status.value], int(row[1]) if row else 0)
        attempts.add_metric([status.value], int(row[2]) if row else 0)
    yield recordings
    yield attempts
    pending = seen.get(Status.PENDING.value)
    yield GaugeMetricFamily(
        "webhook_recordings_retrying",
        "Pending recordings that have failed at least one attempt",
        value=int(pending[3]) if pending else 0,
    )
    archived = seen.get(Status.ARCHIVED.value)
    yield CounterMetricFamily(
        "webhook_archived_bytes",
        "Bytes of audio archived",
        value=int(archived[4]) if archived else 0,
    )
    cumulative = [int(n) for n in archived[7:]] if archived else [0] * len(ARCHIVE_SECONDS_BUCKETS)
    timed = int(archived[6]) if archived else 0
    yield HistogramMetricFamily(
        "webhook_archive_duration_seconds",
        "How long archiving a recording took (download, upload and check), archived ones",
        buckets=[
            *((str(le), n) for le, n in zip(ARCHIVE_SECONDS_BUCKETS, cumulative, strict=True)),
            ("+Inf", timed),
        ],
        sum_value=float(archived[5]) if archived else 0.0,
    )


def _policy_metrics(
    mismatched: int, notice_rows: Sequence[Sequence[Any]], deletion_rows: Sequence[Sequence[Any]]
) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield GaugeMetricFamily(
        "webhook_archive_mismatches",
        "Recordings whose archived copy did not match its SHA-256 when re-read (never deleted "
        "from Plivo)",
        value=mismatched,
    )
    told = CounterMetricFamily(
        "webhook_recording_notices",
        "Recording notices played to conference members, by outcome (played, failed)",
        labels=["outcome"],
    )
    counts = {str(outcome): int(n) for outcome, n in notice_rows}
    for outcome in sorted({*NOTICE_OUTCOMES, *counts}):
        told.add_metric([outcome], counts.get(outcome, 0))
    yield told
    deleted = CounterMetricFamily(
        "webhook_plivo_deletions",
        "Attempts to delete archived recordings from Plivo, by outcome (deleted, failed, "
        "refused, mismatch)",
        labels=["outcome"],
    )
    counts = {str(outcome): int(n) for outcome, n in deletion_rows}
    for outcome in sorted({*DELETION_OUTCOMES, *counts}):
        deleted.add_metric([outcome], counts.get(outcome, 0))
    yield deleted


def _lag(oldest_end_ms: int | None, oldest_created: dt.datetime | None) -> Metric:
    from prometheus_client.core import GaugeMetricFamily

    now = utcnow()
    ages = [0.0]
    if oldest_end_ms is not None:
        ages.append(now.timestamp() - oldest_end_ms / 1000)
    if oldest_created is not None:
        if oldest_created.tzinfo is None:  # SQLite through a Core select keeps no zone
            oldest_created = oldest_created.replace(tzinfo=dt.UTC)
        ages.append((now - oldest_created).total_seconds())
    return GaugeMetricFamily(
        "webhook_archive_lag_seconds",
        "Age of the oldest recording waiting to be archived (0 when none waits)",
        value=max(ages),
    )


def count_refusal(response: Response) -> Response:
    """After a refused callback (4xx or 5xx), add one to its reason's count for this minute."""
    if response.status_code < 400 or not request.path.startswith(CALLBACK_PATH_PREFIX):
        return response
    body = response.get_json(silent=True)
    reason = str(body.get("error", "")) if isinstance(body, dict) else ""
    if reason == "database_unavailable":
        # Nothing can be counted in a database that cannot be reached, and trying would hold
        # the answer Plivo waits for by another timeout.
        return response
    reason = (reason or f"http_{response.status_code}")[:64]
    minute = utcnow().replace(second=0, microsecond=0)
    engine = services(current_app).engine
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    statement = insert(REFUSALS).values(minute=minute, reason=reason, count=1)
    statement = statement.on_conflict_do_update(
        index_elements=[REFUSALS.c.minute, REFUSALS.c.reason],
        set_={"count": REFUSALS.c.count + 1},
    )
    try:
        # Its own connection: the request's session may have been rolled back.
        with engine.begin() as connection:
            connection.execute(statement)
    except DBAPIError as exc:
        log.warning(
            "refused callback not counted",
            extra={"reason": reason, "error": describe_error(exc)},
        )
    return response


def init_app(app: Flask) -> None:
    """Serve /metrics and count refused callbacks."""
    app.register_blueprint(bp)
    app.after_request(count_refusal)
