"""Conference members from member events, snapshots and re-reads; participants of recordings."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy import select

from tests.conftest import post_callback, token_for
from tests.fakeplivo import FakePlivo
from webhook import services
from webhook.db import transaction
from webhook.members import (
    MemberEventReport,
    members_to_notify,
    observe_members,
    record_member_event,
    refresh_recording,
)
from webhook.models import ConferenceMember, MemberEvent, Participant, Recording, Role, Status
from webhook.recordings import RecordingReport, record_report, record_start

T0 = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)
ROOM = "Morning Call"
ALICE, BOB, CAROL = "+442071838750", "+14155550101", "+14155550199"


def at(minutes: float, day: int = 0) -> dt.datetime:
    return T0 + dt.timedelta(days=day, minutes=minutes)


def ms(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000)


def event(
    action: str, member: str, conference_uuid: str | None = "run-1", **extra: str
) -> MemberEventReport:
    return MemberEventReport(
        action=action,
        conference_name=extra.get("name", ROOM),
        member_id=member,
        conference_uuid=conference_uuid,
        call_uuid=extra.get("call_uuid", f"call-{conference_uuid}-{member}"),
        from_number=extra.get("from_number"),
        to_number=extra.get("to_number"),
    )


def deliver(app: Flask, report: MemberEventReport, moment: dt.datetime) -> bool:
    with transaction(services(app).sessions) as session:
        return record_member_event(session, report, now=moment)


def finish(
    app: Flask,
    recording_id: str,
    start: dt.datetime,
    end: dt.datetime,
    conference_uuid: str | None = "run-1",
    name: str = ROOM,
) -> None:
    """The recording's callback, as the callback handler stores it."""
    with transaction(services(app).sessions) as session:
        record_report(
            session,
            RecordingReport(
                recording_id=recording_id,
                record_url=f"https://media.plivo.com/{recording_id}.mp3",
                conference_name=name,
                duration_ms=ms(end) - ms(start),
                start_ms=ms(start),
                end_ms=ms(end),
                conference_uuid=conference_uuid,
            ),
            now=end,
        )
        refresh_recording(session, recording_id)


def participants(app: Flask, recording_id: str) -> dict[str, dict[str, Any]]:
    """The recording's participants as the API shows them, by member id."""
    token_headers = {"Authorization": f"Bearer {_token(app)}"}
    body = app.test_client().get(f"/api/recordings/{recording_id}", headers=token_headers).json
    return {p["member_id"]: p for p in body["participants"]}


def _token(app: Flask) -> str:
    return token_for(app, Role.COMPLIANCE)


def iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def count(app: Flask, model: Any) -> int:
    with services(app).sessions() as session:
        return int(session.scalar(select(sa.func.count()).select_from(model)) or 0)


# --- the callback door ----------------------------------------------------------------------------


def member_params(action: str, member: str = "3", **changes: str) -> dict[str, str]:
    params = {
        "ConferenceAction": action,
        "ConferenceName": ROOM,
        "ConferenceUUID": "run-http",
        "ConferenceMemberID": member,
        "CallUUID": f"call-http-{member}",
    }
    params.update(changes)
    return {k: v for k, v in params.items() if v != ""}


def test_a_member_event_is_stored_once_and_its_retry_answers_duplicate(app, client, plivo):
    first = post_callback(client, plivo, member_params("enter"))
    again = post_callback(client, plivo, member_params("enter"))  # Plivo's retry: fresh nonce
    assert (first.status_code, first.json["status"]) == (200, "accepted")
    assert (again.status_code, again.json["status"]) == (200, "duplicate")
    assert count(app, MemberEvent) == 1
    with services(app).sessions() as session:
        member = session.scalars(select(ConferenceMember)).one()
    assert (member.conference_uuid, member.call_uuid, member.member_id) == (
        "run-http",
        "call-http-3",
        "3",
    )
    assert member.joined_at is not None and member.left_at is None
    assert member.source == "event"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"ConferenceName": ""}, "ConferenceName"),
        ({"ConferenceMemberID": ""}, "ConferenceMemberID"),
        ({"ConferenceMemberID": "x" * 65}, "ConferenceMemberID"),
        ({"CallUUID": "", "ConferenceUUID": ""}, "CallUUID"),
        ({"From": "+1415\x01"}, "From"),
    ],
)
def test_a_bad_member_event_is_400_naming_the_field_and_nothing_is_stored(
    app, client, plivo, changes, field
):
    response = post_callback(client, plivo, member_params("exit", **changes))
    assert response.status_code == 400, response.json
    assert response.json["error"] == f"invalid_{field}"
    assert count(app, MemberEvent) == 0
    assert count(app, ConferenceMember) == 0


def test_digits_and_floor_events_are_acknowledged_without_a_member(app, client, plivo):
    response = post_callback(client, plivo, member_params("digits", Digits="5"))
    assert response.json == {"status": "ignored", "conference_action": "digits"}
    assert count(app, ConferenceMember) == 0


def test_member_events_are_append_only_in_the_database(app, client, plivo):
    post_callback(client, plivo, member_params("enter"))
    engine = services(app).engine
    for statement in (
        MemberEvent.__table__.update().values(action="exit"),
        MemberEvent.__table__.delete(),
    ):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(statement)


def test_member_events_cannot_be_truncated_or_replaced(app, client, plivo):
    post_callback(client, plivo, member_params("enter"))
    engine = services(app).engine
    with engine.connect() as conn:
        row = dict(conn.execute(select(MemberEvent.__table__)).mappings().one())
    if engine.dialect.name == "postgresql":
        sneaky = sa.text("TRUNCATE member_events CASCADE")
    else:
        columns = ", ".join(f'"{name}"' for name in row)
        values = ", ".join(f":{name}" for name in row)
        replace = f"INSERT OR REPLACE INTO member_events ({columns}) VALUES ({values})"  # noqa: S608 - the table's own column names
        sneaky = sa.text(replace)
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.execute(sneaky, {**row, "action": "exit"})
    assert count(app, MemberEvent) == 1


def test_an_event_carrying_from_and_to_keeps_them(app, client, plivo):
    post_callback(client, plivo, member_params("enter", From=ALICE, To="+14155550100"))
    with services(app).sessions() as session:
        member = session.scalars(select(ConferenceMember)).one()
    assert (member.from_number, member.to_number) == (ALICE, "+14155550100")


# --- who was present while a recording ran --------------------------------------------------------


def test_participants_are_the_members_present_while_the_recording_ran(app):
    deliver(app, event("enter", "1", from_number=ALICE), at(0))  # before the recording
    deliver(app, event("enter", "2", from_number=BOB), at(5))  # during it
    finish(app, "rec-1", start=at(1), end=at(10))
    # Events arriving after the recording's callback still attach (or not).
    deliver(app, event("enter", "3", from_number=CAROL), at(12))  # after it ended
    deliver(app, event("exit", "2"), at(8))
    deliver(app, event("exit", "4"), at(0.5))  # left before it began (its enter arrives late)
    deliver(app, event("enter", "4"), at(13))
    shown = participants(app, "rec-1")
    assert sorted(shown) == ["1", "2"]
    assert (shown["1"]["joined_at"], shown["1"]["left_at"]) == (iso(at(0)), None)
    assert (shown["2"]["joined_at"], shown["2"]["left_at"]) == (iso(at(5)), iso(at(8)))
    assert shown["2"]["source"] == "event"


def test_an_exit_arriving_before_its_enter_keeps_a_sane_presence(app):
    deliver(app, event("exit", "1"), at(6))
    deliver(app, event("enter", "1"), at(7))  # the enter was retried and arrived last
    finish(app, "rec-1", start=at(1), end=at(10))
    shown = participants(app, "rec-1")
    assert (shown["1"]["joined_at"], shown["1"]["left_at"]) == (iso(at(6)), iso(at(6)))


def test_a_call_that_comes_back_is_present_again(app):
    deliver(app, event("enter", "1", call_uuid="call-x"), at(0))
    deliver(app, event("exit", "1", call_uuid="call-x"), at(1))
    deliver(app, event("enter", "5", call_uuid="call-x"), at(4))  # back, a new member id
    finish(app, "rec-1", start=at(2), end=at(10))
    shown = participants(app, "rec-1")
    assert list(shown) == ["5"]
    assert (shown["5"]["joined_at"], shown["5"]["left_at"]) == (iso(at(0)), None)
    # Its second exit, and an exit and enter of a third stint arriving in reverse order.
    deliver(app, event("exit", "5", call_uuid="call-x"), at(12))
    deliver(app, event("exit", "7", call_uuid="call-x"), at(14))
    deliver(app, event("enter", "7", call_uuid="call-x"), at(15))
    assert participants(app, "rec-1")["7"]["left_at"] == iso(at(14))


def test_the_same_conference_name_the_next_day_does_not_mix_participants(app):
    deliver(app, event("enter", "1", from_number=ALICE), at(0))  # its exit never arrives
    deliver(app, event("enter", "2", from_number=BOB), at(2))
    deliver(app, event("exit", "2"), at(20))
    finish(app, "monday", start=at(1), end=at(30))
    # Tuesday: the same name, a new run of the conference; member ids start again at 1.
    deliver(app, event("enter", "1", "run-2", from_number=CAROL), at(0, day=1))
    finish(app, "tuesday", start=at(1, day=1), end=at(30, day=1), conference_uuid="run-2")
    assert {p["from"] for p in participants(app, "monday").values()} == {ALICE, BOB}
    assert {p["from"] for p in participants(app, "tuesday").values()} == {CAROL}


def test_without_conference_uuids_yesterdays_open_member_is_not_todays_participant(app):
    deliver(app, event("enter", "1", None, call_uuid="c-a", from_number=ALICE), at(0))
    finish(app, "monday", start=at(1), end=at(30), conference_uuid=None)
    deliver(app, event("enter", "1", None, call_uuid="c-b", from_number=BOB), at(0, day=1))
    finish(app, "tuesday", start=at(1, day=1), end=at(30, day=1), conference_uuid=None)
    assert {p["from"] for p in participants(app, "monday").values()} == {ALICE}
    assert {p["from"] for p in participants(app, "tuesday").values()} == {BOB}


def test_search_by_participant_finds_the_recordings_they_were_on(app, client, auth):
    deliver(app, event("enter", "1", from_number=ALICE), at(0))
    finish(app, "rec-1", start=at(1), end=at(10))
    deliver(app, event("enter", "2", from_number=BOB), at(12))
    finish(app, "rec-2", start=at(11), end=at(20))
    headers = auth(Role.COMPLIANCE)

    def found(number: str) -> list[str]:
        response = client.get(
            "/api/recordings", query_string={"participant": number}, headers=headers
        )
        return [r["recording_id"] for r in response.json["recordings"]]

    assert found("+44 20 7183 8750") == ["rec-2", "rec-1"]  # Alice never left
    assert found("1 (415) 555-0101") == ["rec-2"]


def test_participants_learnt_from_events_appear_in_the_export(app, client, auth):
    deliver(app, event("enter", "1", from_number=ALICE), at(0))
    finish(app, "rec-1", start=at(1), end=at(10))
    response = client.get(
        "/api/recordings/export", query_string={"format": "csv"}, headers=auth(Role.COMPLIANCE)
    )
    assert ALICE in response.get_data(as_text=True)


# --- snapshots and re-reads -----------------------------------------------------------------------


def test_a_re_read_merges_a_member_seen_at_the_start_and_adds_a_late_joiner(app):
    first = {"member_id": "1", "call_uuid": "call-a", "from": ALICE, "join_time": "60"}
    late = {"member_id": "2", "call_uuid": "call-b", "from": BOB, "join_time": "0"}
    with transaction(services(app).sessions) as session:
        record_start(session, "api-rec", ROOM, "mp3", None, None, [first], "ops", "")
        session.execute(
            sa.update(Recording)
            .values(start_ms=ms(at(0)))
            .where(Recording.recording_id == "api-rec")
        )
    with transaction(services(app).sessions) as session:
        seen = observe_members(session, ROOM, [first, late], "poll", at(2))
        assert len(seen) == 2
        refresh_recording(session, "api-rec")
    assert count(app, ConferenceMember) == 2
    shown = participants(app, "api-rec")
    assert sorted(shown) == ["1", "2"]
    assert shown["2"]["joined_at"] == iso(at(2))
    assert shown["2"]["source"] == "poll"
    assert shown["1"]["source"] == "snapshot"


def test_members_to_notify_are_those_in_a_conference_being_recorded_not_yet_told(
    app, plivo, client, auth
):
    plivo.add_conference(ROOM, [{"from": ALICE}])
    started = client.post(f"/api/conferences/{ROOM}/recording", headers=auth(Role.OPERATOR))
    assert started.status_code == 201, started.json
    with transaction(services(app).sessions) as session:
        waiting = members_to_notify(session)
        assert [m.from_number for m in waiting] == [ALICE]
        waiting[0].notified_at = dt.datetime.now(dt.UTC)
    with transaction(services(app).sessions) as session:
        assert members_to_notify(session) == []
    body = client.get(
        f"/api/recordings/{started.json['recording_id']}", headers=auth(Role.COMPLIANCE)
    ).json
    assert body["participants"][0]["notified_at"] is not None


def test_participant_rows_are_not_duplicated_when_recomputed(app):
    deliver(app, event("enter", "1", from_number=ALICE), at(0))
    finish(app, "rec-1", start=at(1), end=at(10))
    with transaction(services(app).sessions) as session:
        refresh_recording(session, "rec-1")
        refresh_recording(session, "rec-1")
    assert count(app, Participant) == 1


def test_status_recording_has_no_end_yet(app):
    with transaction(services(app).sessions) as session:
        record_start(session, "api-rec", ROOM, "mp3", None, None, [], "ops", "")
        recording = session.scalars(select(Recording)).one()
        assert recording.status == Status.RECORDING
    deliver(app, event("enter", "9", None, call_uuid="c-late"), dt.datetime.now(dt.UTC))
    assert sorted(participants(app, "api-rec")) == ["9"]


def test_snapshots_from_before_members_existed_keep_showing(app, client, auth, plivo: FakePlivo):
    # A participant row as older versions stored it: no member behind it.
    with transaction(services(app).sessions) as session:
        record_start(session, "old", ROOM, "mp3", None, None, [], "ops", "")
        recording = session.scalars(select(Recording)).one()
        session.add(
            Participant(
                recording_pk=recording.id,
                member_id="1",
                from_number=ALICE,
                from_key="442071838750",
                source="snapshot",
            )
        )
    finish(app, "old", start=at(1), end=at(10), conference_uuid=None)
    assert [p["from"] for p in participants(app, "old").values()] == [ALICE]
