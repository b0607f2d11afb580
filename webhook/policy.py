"""Recording policy: which conferences must be recorded, and starting them (AUTO_RECORD)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from webhook.conferences import AlreadyRecording, start_recording
from webhook.errors import APIError

if TYPE_CHECKING:
    from webhook import Services

log = logging.getLogger(__name__)

AUTO_RECORD_STARTER = "policy:auto-record"


def must_record(patterns: tuple[str, ...], conference_name: str) -> bool:
    """Whether a conference name matches one of the AUTO_RECORD patterns (`*`, `trading/*`)."""
    return any(fnmatchcase(conference_name, pattern) for pattern in patterns)


@dataclass
class AutoRecorded:
    """What one pass of auto-record did."""

    live: int = 0
    matching: int = 0
    started: int = 0
    failed: int = 0


def auto_record(svc: Services) -> AutoRecorded:
    """Start a recording of every live conference that must be recorded and has none running.

    A conference being recorded already (by this pass, another worker or an operator) is left
    alone; one that ended before its recording could start is not an error. Raises PlivoError
    only when the live conferences cannot be listed.
    """
    result = AutoRecorded()
    names = svc.plivo.list_conferences()
    result.live = len(names)
    for name in names:
        if not must_record(svc.settings.auto_record, name) or len(name) > 255:
            continue
        result.matching += 1
        try:
            recording_id = start_recording(svc, name, "mp3", AUTO_RECORD_STARTER)
        except AlreadyRecording:
            continue
        except APIError as exc:
            if exc.status == 404:
                log.info(
                    "conference ended before its recording started", extra={"conference": name}
                )
                continue
            result.failed += 1
            log.warning(
                "auto-record could not start a recording: %s",
                exc.message,
                extra={"conference": name, "error": exc.code},
            )
            continue
        result.started += 1
        log.info(
            "auto-record started a recording",
            extra={"conference": name, "recording_id": recording_id},
        )
    return result
