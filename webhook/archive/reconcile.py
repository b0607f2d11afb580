"""Finding recordings whose callbacks never came: Plivo's Recording API against the archive."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from webhook.db import transaction
from webhook.errors import BadParameter
from webhook.members import refresh_recording
from webhook.models import ReconcileRun, utcnow
from webhook.recordings import insert_ignoring_conflict, parse_report, record_report

if TYPE_CHECKING:
    from webhook import Services

log = logging.getLogger(__name__)


@dataclass
class Reconciled:
    """What one pass found."""

    seen: int = 0
    queued: int = 0
    skipped: int = 0
    windows: int = 0
    resumed_at: dt.datetime | None = None

    @property
    def known(self) -> int:
        return self.seen - self.queued - self.skipped

    def summary(self) -> str:
        return (
            f"reconcile: {self.seen} recording(s) on Plivo, {self.queued} queued, "
            f"{self.known} already known, {self.skipped} skipped"
        )


def as_callback_fields(details: dict[str, Any]) -> dict[str, str]:
    """A Plivo Recording API object in the callback's field names."""
    return {
        "recording_id": str(details.get("recording_id") or ""),
        "record_url": str(details.get("recording_url") or ""),
        "conference_name": str(details.get("conference_name") or ""),
        "recording_duration_ms": str(details.get("recording_duration_ms") or ""),
        "recording_start_ms": str(details.get("recording_start_ms") or ""),
        "recording_end_ms": str(details.get("recording_end_ms") or ""),
    }


# Plivo lists the last 7 days without an add_time filter and refuses a range over 30 days.
LIST_WINDOW = dt.timedelta(days=30)
PLIVO_TIME = "%Y-%m-%d %H:%M:%S"


def whole_second(moment: dt.datetime) -> dt.datetime:
    """A time in UTC without its fraction (Plivo's filters take whole seconds)."""
    return moment.astimezone(dt.UTC).replace(microsecond=0)


def list_windows(
    since: dt.datetime, until: dt.datetime
) -> Iterator[tuple[dt.datetime, dt.datetime]]:
    """[start, end) windows Plivo accepts, oldest first, covering since..until."""
    start = whole_second(since)
    while start < until:
        end = min(start + LIST_WINDOW, until)
        yield start, end
        start = end


def _queue_listed(
    svc: Services,
    filters: dict[str, str],
    result: Reconciled,
    progress: Callable[[], None],
    warn: Callable[[str], None],
) -> None:
    """Queue what one listing of Plivo's recordings holds that the archive lacks."""
    for details in svc.plivo.iter_recordings(**filters):
        result.seen += 1
        progress()
        if details.get("recording_type") not in (None, "conference"):
            result.skipped += 1  # not ours to archive; not "already known" either
            continue
        try:
            report = parse_report(as_callback_fields(details))
        except BadParameter as exc:
            result.skipped += 1
            warn(f"skipped {details.get('recording_id')}: {exc.message}")
            continue
        with transaction(svc.sessions) as session:
            result.queued += record_report(session, report)
            refresh_recording(session, report.recording_id)


def _window_filters(start: dt.datetime, end: dt.datetime) -> dict[str, str]:
    return {
        "add_time__gte": start.strftime(PLIVO_TIME),
        "add_time__lt": end.strftime(PLIVO_TIME),
    }


def _until_now() -> dt.datetime:
    # One second past now, so a recording added during this very second is inside the window.
    return whole_second(utcnow()) + dt.timedelta(seconds=1)


def reconcile(
    svc: Services,
    since: dt.datetime | None = None,
    progress: Callable[[], None] = lambda: None,
    warn: Callable[[str], None] = log.warning,
) -> Reconciled:
    """Queue every conference recording Plivo added since `since` that the archive lacks.

    Without `since`, what Plivo lists by default (its last 7 days); with it, windows of at most
    30 days from `since` to now, oldest first. Idempotent: a recording already known is left as
    it is. Raises PlivoError when Plivo fails.
    """
    result = Reconciled()
    if since is None:
        result.windows = 1
        _queue_listed(svc, {}, result, progress, warn)
        return result
    for start, end in list_windows(since, _until_now()):
        _queue_listed(svc, _window_filters(start, end), result, progress, warn)
        result.windows += 1
    return result


def reconcile_history(
    svc: Services,
    since: dt.datetime,
    progress: Callable[[], None] = lambda: None,
    warn: Callable[[str], None] = log.warning,
) -> Reconciled:
    """`reconcile` from `since`, resumable: each window done is kept in the database, so a run
    after an interruption continues where the last one stopped instead of starting over.

    A run that finished is started afresh the next time (new recordings may have come since).
    """
    since = whole_second(since)
    now = utcnow()
    with transaction(svc.sessions) as session:
        insert_ignoring_conflict(
            session, ReconcileRun, {"since": since, "done_until": since, "updated_at": now}
        )
        run = session.scalars(select(ReconcileRun).where(ReconcileRun.since == since)).one()
        if run.finished_at is not None:
            run.done_until, run.finished_at, run.updated_at = since, None, now
        run_id, start_at = run.id, run.done_until
    result = Reconciled(resumed_at=start_at if start_at > since else None)
    for start, end in list_windows(start_at, _until_now()):
        _queue_listed(svc, _window_filters(start, end), result, progress, warn)
        result.windows += 1
        with transaction(svc.sessions) as session:
            session.execute(
                update(ReconcileRun)
                .where(ReconcileRun.id == run_id)
                .values(done_until=end, updated_at=utcnow())
            )
    with transaction(svc.sessions) as session:
        session.execute(
            update(ReconcileRun)
            .where(ReconcileRun.id == run_id)
            .values(finished_at=utcnow(), updated_at=utcnow())
        )
    return result
