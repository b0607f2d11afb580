"""Starting the recording of a live conference: one claim per conference, members, the notice.

The operator API and auto-record both start recordings through `start_recording`, so both take
the same claim and a conference gets one recording, not two, however they race.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, exists, or_, update
from sqlalchemy.orm import Session

from webhook.db import rowcount, transaction
from webhook.errors import APIError, PlivoError
from webhook.models import ConferenceClaim, Recording, Status, utcnow
from webhook.notices import Member, notify_members
from webhook.recordings import insert_ignoring_conflict, record_start
from webhook.transcripts import transcription_url_for

if TYPE_CHECKING:
    from webhook import Services

# Ask Plivo to retry the callback up to 5 times on any failure, not once on a timeout only.
CALLBACK_RETRY_FRAGMENT = "#rc=5&rp=all"
# A claim whose start never finished (the process died while asking Plivo) is free after this.
UNSTARTED_CLAIM_SECONDS = 120
# Plivo's conference_run_time is whole seconds and our clock reads it a little late.
RUN_TIME_SLACK_SECONDS = 5


class AlreadyRecording(APIError):
    """The conference is being recorded already (or another process is starting it right now)."""

    def __init__(self, name: str) -> None:
        super().__init__(409, "already_recording", f"Conference {name!r} is being recorded already")


@contextmanager
def conference_running(name: str) -> Iterator[None]:
    """Turn Plivo's 404 for a conference into our own `conference_not_found`."""
    try:
        yield
    except PlivoError as exc:
        if exc.status == 404:
            raise APIError(
                404, "conference_not_found", f"No conference named {name!r} is running"
            ) from None
        raise


def _running_since(conference: dict[str, Any], now: dt.datetime) -> dt.datetime | None:
    """When this run of the conference began, from Plivo's `conference_run_time` (seconds)."""
    try:
        seconds = float(conference.get("conference_run_time") or "")
    except ValueError:
        return None
    if not 0 <= seconds < 10**9:
        return None
    return now - dt.timedelta(seconds=seconds + RUN_TIME_SLACK_SECONDS)


def claim_conference(
    session: Session, name: str, by: str, running_since: dt.datetime | None
) -> str | None:
    """Take the conference's claim; its token, or None while another holds it.

    The primary key on the conference name makes this atomic. A claim is stale, and taken over,
    when its recording is no longer in progress (it ended, or was never stored and the start is
    long past), or when it was made before this run of the conference began (a callback lost).
    """
    now = utcnow()
    token = str(uuid.uuid4())
    values = {"token": token, "claimed_at": now, "claimed_by": by[:64], "recording_id": None}
    if insert_ignoring_conflict(session, ConferenceClaim, {"conference_name": name, **values}):
        return token
    claim = ConferenceClaim
    stale = or_(
        and_(
            claim.recording_id.is_(None),
            claim.claimed_at < now - dt.timedelta(seconds=UNSTARTED_CLAIM_SECONDS),
        ),
        and_(
            claim.recording_id.is_not(None),
            ~exists().where(
                Recording.recording_id == claim.recording_id,
                Recording.status == Status.RECORDING,
            ),
        ),
    )
    if running_since is not None:
        stale = or_(stale, claim.claimed_at < running_since)
    taken = session.execute(
        update(ConferenceClaim)
        .where(ConferenceClaim.conference_name == name, stale)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return token if rowcount(taken) == 1 else None


def _release(svc: Services, name: str, token: str) -> None:
    with transaction(svc.sessions) as session:
        session.execute(
            delete(ConferenceClaim).where(
                ConferenceClaim.conference_name == name, ConferenceClaim.token == token
            )
        )


def start_recording(svc: Services, name: str, file_format: str, started_by: str) -> str:
    """Start recording a live conference, snapshot its members and tell them; the recording id.

    Raises AlreadyRecording (409) while the conference is being recorded, APIError 404 when it
    is not running, PlivoError when Plivo fails. The notice failing does not fail the start.
    """
    settings = svc.settings
    if not settings.public_url:
        raise APIError(503, "public_url_not_set", "PUBLIC_URL must be set so Plivo can call back")
    plivo = svc.plivo
    # The members first: a conference that is not running fails here, before anything starts.
    with conference_running(name):
        conference = plivo.get_conference(name)
    with transaction(svc.sessions) as session:
        token = claim_conference(session, name, started_by, _running_since(conference, utcnow()))
    if token is None:
        raise AlreadyRecording(name)
    try:
        with conference_running(name):
            started = plivo.start_recording(
                name,
                file_format,
                settings.public_url + "/plivo/recording" + CALLBACK_RETRY_FRAGMENT,
                transcription_url=transcription_url_for(settings),
            )
        recording_id = started.get("recording_id")
        if not recording_id:
            raise APIError(502, "plivo_error", "Plivo did not answer with a recording_id")
    except APIError:
        _release(svc, name, token)
        raise
    members = list(conference.get("members") or [])
    with transaction(svc.sessions) as session:
        recording = record_start(
            session,
            recording_id=str(recording_id),
            conference_name=name,
            file_format=file_format,
            api_id=started.get("api_id"),
            record_url=started.get("url"),
            members=members,
            started_by=started_by,
            # Not among Retrieve Conference's documented fields: taken if Plivo ever sends it.
            conference_uuid=conference.get("conference_uuid") or None,
        )
        session.execute(
            update(ConferenceClaim)
            .where(ConferenceClaim.conference_name == name, ConferenceClaim.token == token)
            .values(recording_id=str(recording_id))
        )
        session.flush()
        recording_pk = recording.id
    # Told once the recording runs, so the notice itself is part of the record (if Plivo records
    # what it plays to members: unverified).
    notify_members(
        svc,
        recording_pk,
        str(recording_id),
        name,
        [
            Member(str(m.get("member_id") or ""), str(m.get("call_uuid") or "") or None)
            for m in members
        ],
    )
    return str(recording_id)
