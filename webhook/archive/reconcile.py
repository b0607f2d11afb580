"""Finding recordings whose callbacks never came: Plivo's Recording API against the archive."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from webhook.db import transaction
from webhook.errors import BadParameter
from webhook.recordings import parse_report, record_report

if TYPE_CHECKING:
    from webhook import Services

log = logging.getLogger(__name__)


@dataclass
class Reconciled:
    """What one pass found."""

    seen: int = 0
    queued: int = 0
    skipped: int = 0

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


def reconcile(
    svc: Services,
    since: dt.datetime | None = None,
    progress: Callable[[], None] = lambda: None,
    warn: Callable[[str], None] = log.warning,
) -> Reconciled:
    """Queue every conference recording Plivo added since `since` that the archive lacks.

    Idempotent: a recording already known is left as it is. Raises PlivoError when Plivo fails.
    """
    filters: dict[str, str] = {}
    if since is not None:
        filters["add_time__gte"] = since.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    result = Reconciled()
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
    return result
