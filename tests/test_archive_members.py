"""The worker's member chores: Call API lookups with retries, re-reads while recording."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, update

from tests.conftest import MP3_TAG, post_callback, token_for
from tests.fakeplivo import FakePlivo
from webhook import services
from webhook.archive.members import (
    DETAILS_MAX_ATTEMPTS,
    details_retry_delay,
    fill_member_details,
    poll_members,
)
from webhook.archive.worker import Worker
from webhook.db import transaction
from webhook.members import MemberEventReport, record_member_event, refresh_recording
from webhook.models import ConferenceMember, Recording, Role, Status, utcnow
from webhook.recordings import RecordingReport, record_report

ROOM = "Desk 4"
DANA, EVE = "+14155550123", "+442071838750"


def member(app: Flask) -> ConferenceMember:
    with services(app).sessions() as session:
        return session.scalars(select(ConferenceMember)).one()


def api_body(app: Flask, path: str, **query: str) -> Any:
    headers = {"Authorization": f"Bearer {token_for(app, Role.COMPLIANCE)}"}
    response = app.test_client().get(path, query_string=query, headers=headers)
    assert response.status_code == 200, response.json
    return response.json


def xml_recording_with_a_member(app: Flask, plivo: FakePlivo, register_call: bool = True) -> str:
    """A Conference XML recording with one member who entered before it: its enter event and
    the recording's callback delivered; the member's number not yet known."""
    enter = plivo.join(ROOM, DANA, "+14155550100", caller_name="Dana")
    if not register_call:
        plivo.phone_calls.clear()
    client = app.test_client()
    assert post_callback(client, plivo, enter).json["status"] == "accepted"
    params = plivo.finish_recording("xml-rec", MP3_TAG, scheme="camel", conference_name=ROOM)
    assert post_callback(client, plivo, params).json["status"] == "accepted"
    return "xml-rec"


def test_who_a_member_is_comes_from_the_live_call(app, plivo):
    recording_id = xml_recording_with_a_member(app, plivo)
    assert api_body(app, "/api/recordings", participant=DANA)["recordings"] == []
    assert fill_member_details(services(app)) == 1
    found = member(app)
    assert (found.from_number, found.caller_name, found.direction) == (DANA, "Dana", "inbound")
    assert found.details_at is not None
    listed = api_body(app, "/api/recordings", participant="+1 415-555-0123")["recordings"]
    assert [r["recording_id"] for r in listed] == [recording_id]
    assert listed[0]["participants"][0]["caller_name"] == "Dana"
    calls = [path for method, path, _ in plivo.calls if "/Call/" in path]
    assert len(calls) == 1


def test_after_hang_up_who_a_member_was_comes_from_the_call_record(app, plivo):
    xml_recording_with_a_member(app, plivo)
    plivo.leave(ROOM, "1")
    assert fill_member_details(services(app)) == 1
    found = member(app)
    assert (found.from_number, found.to_number, found.direction) == (
        DANA,
        "+14155550100",
        "inbound",
    )
    assert found.caller_name is None  # the call record does not say


@pytest.mark.parametrize("fault", ["404", "500", "timeout"])
def test_failed_lookups_are_retried_later_and_never_hold_up_archiving(
    app, plivo, fault: str
) -> None:
    recording_id = xml_recording_with_a_member(app, plivo, register_call=fault != "404")
    svc = services(app)
    if fault == "500":
        plivo.api_faults.extend([500, 500, 500])  # the client's own retries of a GET, then ours
    if fault == "timeout":
        plivo.stall_seconds = 1.0
        svc.plivo.lookup_timeout = (1.0, 0.2)
        plivo.api_faults.extend(["stall"] * 3)
    before = utcnow()
    assert fill_member_details(svc) == 0
    failed = member(app)
    assert failed.details_at is None
    assert failed.details_attempts == 1
    expected_code = {"404": "not_found", "500": "plivo_error", "timeout": "plivo_timeout"}
    assert (failed.details_error or "").startswith(expected_code[fault]), failed.details_error
    assert failed.details_next_at is not None
    assert failed.details_next_at >= before + dt.timedelta(seconds=details_retry_delay(1) - 1)
    # Not due yet: nothing asked.
    asked = len(plivo.calls)
    assert fill_member_details(svc) == 0
    assert len(plivo.calls) == asked

    # The recording archives all the same, its participant shown with what is known.
    assert Worker(svc).run(once=True) == 1
    body = api_body(app, f"/api/recordings/{recording_id}")
    assert body["status"] == Status.ARCHIVED
    assert [(p["from"], p["call_uuid"] is not None) for p in body["participants"]] == [(None, True)]

    # Later, Plivo answers: the member is filled in, and so is the participant.
    if fault == "404":
        plivo.add_call(DANA, "+14155550100", "Dana", call_uuid=failed.call_uuid)
    assert fill_member_details(svc, now=failed.details_next_at) == 1
    assert member(app).from_number == DANA
    body = api_body(app, f"/api/recordings/{recording_id}")
    assert [p["from"] for p in body["participants"]] == [DANA]


def test_lookups_give_up_after_the_last_attempt_and_the_member_stays(app, plivo):
    recording_id = xml_recording_with_a_member(app, plivo, register_call=False)
    svc = services(app)
    moment = utcnow()
    for _ in range(DETAILS_MAX_ATTEMPTS):
        fill_member_details(svc, now=moment)
        moment += dt.timedelta(days=1)
    gave_up = member(app)
    assert gave_up.details_attempts == DETAILS_MAX_ATTEMPTS
    assert gave_up.details_next_at is None
    asked = len(plivo.calls)
    assert fill_member_details(svc, now=moment) == 0
    assert len(plivo.calls) == asked
    assert len(api_body(app, f"/api/recordings/{recording_id}")["participants"]) == 1


# --- re-reads while recording ---------------------------------------------------------------------


def test_an_api_started_recording_finds_a_member_who_joined_two_minutes_after_the_start(
    app, client, plivo, auth
):
    plivo.add_conference(ROOM, [{"from": DANA, "to": "+14155550100", "call_uuid": "call-dana"}])
    started = client.post(f"/api/conferences/{ROOM}/recording", headers=auth(Role.OPERATOR))
    assert started.status_code == 201, started.json
    recording_id = started.json["recording_id"]
    start = dt.datetime.fromtimestamp(started.json["start_ms"] / 1000, dt.UTC)
    svc = services(app)

    # Two minutes in, Eve joins; the next re-read finds her (the clock is the chore's `now`).
    plivo.conferences[ROOM]["members"].append(
        {"member_id": "2", "from": EVE, "to": "+14155550100", "call_uuid": "call-eve"}
    )
    assert poll_members(svc, now=start + dt.timedelta(minutes=2)) == 1
    assert poll_members(svc, now=start + dt.timedelta(minutes=3)) == 1  # merged, not duplicated
    # Dana hangs up; the re-read after it gives her leave time.
    plivo.conferences[ROOM]["members"].pop(0)
    assert poll_members(svc, now=start + dt.timedelta(minutes=4)) == 1

    params = plivo.finish_recording(recording_id, MP3_TAG, duration_ms=300_000)
    params["recording_start_ms"] = str(started.json["start_ms"])
    params["recording_end_ms"] = str(started.json["start_ms"] + 300_000)
    assert post_callback(client, plivo, params).json["status"] == "accepted"

    body = api_body(app, f"/api/recordings/{recording_id}")
    shown = {p["from"]: p for p in body["participants"]}
    assert sorted(shown) == sorted([DANA, EVE])
    assert shown[EVE]["joined_at"] == (start + dt.timedelta(minutes=2)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert shown[EVE]["source"] == "poll"
    assert shown[DANA]["source"] == "snapshot"
    assert shown[DANA]["left_at"] == (start + dt.timedelta(minutes=4)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    found = api_body(app, "/api/recordings", participant="44 20 7183 8750")["recordings"]
    assert [r["recording_id"] for r in found] == [recording_id]
    # No longer recording: no more re-reads.
    asked = len(plivo.calls)
    assert poll_members(svc) == 0
    assert len(plivo.calls) == asked


def test_a_conference_that_ended_closes_its_members(app, client, plivo, auth):
    plivo.add_conference(ROOM, [{"from": DANA, "call_uuid": "call-dana"}])
    started = client.post(f"/api/conferences/{ROOM}/recording", headers=auth(Role.OPERATOR))
    assert started.status_code == 201
    plivo.end_conference(ROOM)
    assert poll_members(services(app)) == 1
    assert member(app).left_at is not None


def test_a_failing_re_read_is_logged_and_left_for_the_next_turn(app, client, plivo, auth):
    plivo.add_conference(ROOM, [{"from": DANA, "call_uuid": "call-dana"}])
    assert client.post(f"/api/conferences/{ROOM}/recording", headers=auth(Role.OPERATOR))
    plivo.api_faults.extend([500, 500, 500])
    assert poll_members(services(app)) == 0
    assert member(app).left_at is None


def test_the_worker_re_reads_members_every_member_poll_seconds_and_not_at_zero(
    make_app, plivo, auth
):
    # Off first: a turn claimed by the 1-second run would otherwise hide a poll at 0.
    for seconds, expected in (("0", 0), ("1", 1)):
        app = make_app(MEMBER_POLL_SECONDS=seconds)
        assert services(app).settings.member_poll_seconds == int(seconds)
        plivo.add_conference(ROOM, [{"from": DANA, "call_uuid": f"call-{seconds}"}])
        with transaction(services(app).sessions) as session:
            session.execute(update(Recording).values(status=Status.ARCHIVED))
        headers = {"Authorization": f"Bearer {_operator(app)}"}
        started = app.test_client().post(f"/api/conferences/{ROOM}/recording", headers=headers)
        assert started.status_code == 201
        before = len(plivo.calls)
        Worker(services(app))._chores()
        reads = [p for m, p, _ in plivo.calls[before:] if p.endswith(f"/Conference/{ROOM}/")]
        assert len(reads) == expected, seconds


def _operator(app: Flask) -> str:
    return token_for(app, Role.OPERATOR)


def test_an_end_learnt_from_the_recording_api_recomputes_the_participants(app, plivo):
    """A Conference XML callback without end or duration: its arrival bounds the end until the
    worker learns the true end, which drops a member who entered after it."""
    svc = services(app)
    start = utcnow() - dt.timedelta(minutes=10)
    true_end, entered, arrived = (start + dt.timedelta(minutes=m) for m in (2, 5, 9))
    plivo.finish_recording("late-end", MP3_TAG, conference_name=ROOM)
    plivo.recordings["late-end"].update(
        recording_duration_ms="120000.00000",
        recording_end_ms=f"{true_end.timestamp() * 1000:.5f}",
    )
    with transaction(svc.sessions) as session:
        record_report(
            session,
            RecordingReport(
                recording_id="late-end",
                record_url=plivo.media_url("late-end"),
                conference_name=ROOM,
                start_ms=int(start.timestamp() * 1000),
            ),
            now=arrived,
        )
        record_member_event(
            session,
            MemberEventReport("enter", ROOM, "1", None, "call-late", DANA, None),
            now=entered,
        )
        refresh_recording(session, "late-end")
    assert [p["from"] for p in api_body(app, "/api/recordings/late-end")["participants"]] == [DANA]
    assert Worker(svc).run(once=True) == 1
    body = api_body(app, "/api/recordings/late-end")
    assert body["end_ms"] == int(true_end.timestamp() * 1000)
    assert body["participants"] == []
