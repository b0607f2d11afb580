"""Recording policy: auto-record, the recording notice, and their settings."""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, update

from tests.conftest import PUBLIC_URL, AppFactory, post_callback, token_for
from tests.fakeplivo import FakePlivo
from tests.processes import Process, process_env
from webhook import services
from webhook.archive.worker import Worker
from webhook.conferences import AlreadyRecording, start_recording
from webhook.config import ConfigError, load
from webhook.db import transaction
from webhook.models import (
    ConferenceClaim,
    ConferenceMember,
    Recording,
    Role,
    Schedule,
    Status,
    utcnow,
)
from webhook.notices import (
    MAX_FAILED_NOTICES,
    START_NOTICE_SECONDS,
    notify_entered,
    notify_member,
)
from webhook.policy import AUTO_RECORD_STARTER, auto_record, must_record
from webhook.recordings import record_start

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NOTICE = "This call is recorded for regulatory purposes."


def recordings_of(app: Flask, conference: str | None = None) -> list[Recording]:
    with services(app).sessions() as session:
        query = select(Recording).order_by(Recording.id)
        if conference is not None:
            query = query.where(Recording.conference_name == conference)
        return list(session.scalars(query))


def record_calls(plivo: FakePlivo, conference: str) -> int:
    """How many times Plivo was asked to start recording this conference."""
    path = f"/Conference/{conference}/Record/"  # the fake keeps paths decoded
    return sum(1 for method, p, _ in plivo.calls if method == "POST" and p.endswith(path))


def wait_for(condition: Callable[[], bool], seconds: float) -> float:
    """Poll until `condition()`; how long it took, or AssertionError after `seconds`."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > seconds:
            raise AssertionError(f"not true after {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - began


# --- which conferences ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "name", "expected"),
    [
        (("*",), "anything at all", True),
        (("trading/*",), "trading/desk-1", True),
        (("trading/*",), "trading", False),
        (("trading/*",), "Trading/desk-1", False),
        (("trading/*", "board"), "board", True),
        ((), "board", False),
    ],
)
def test_auto_record_patterns(patterns, name, expected) -> None:
    assert must_record(patterns, name) is expected


# --- auto-record with two worker processes -------------------------------------------------------


def test_two_workers_start_exactly_one_recording_per_matching_conference(
    database_url: str, plivo: FakePlivo, tmp_path: Path, make_app: AppFactory
) -> None:
    for name in ("trading/desk-1", "trading/desk-2", "sales/floor"):
        plivo.add_conference(name)
    env = process_env(
        BIN,
        tmp_path / "home",
        {
            "DATABASE_URL": database_url,
            "ARCHIVE_URL": f"file://{tmp_path}/archive",
            "PLIVO_AUTH_ID": plivo.auth_id,
            "PLIVO_AUTH_TOKEN": plivo.auth_token,
            "PLIVO_API_URL": plivo.url,
            "PUBLIC_URL": PUBLIC_URL,
            "RECORDING_HOSTS": "127.0.0.1",
            "AUTO_RECORD": "trading/*",
            "AUTO_RECORD_INTERVAL_SECONDS": "2",
            "RECORDING_NOTICE_TEXT": NOTICE,
            "RECORDING_NOTICE_VOICE": "MAN",
        },
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    workers = [Process(f"worker-{n}", "webhook worker", env, ROOT, logs) for n in (1, 2)]
    engine_app = make_app()  # only to look at the database the workers share
    try:

        def conferences_recorded() -> set[str]:
            return {str(r.conference_name) for r in recordings_of(engine_app)}

        wait_for(lambda: conferences_recorded() == {"trading/desk-1", "trading/desk-2"}, 30)
        time.sleep(5)  # more than two turns: nobody starts a second recording
        assert sorted(conferences_recorded()) == ["trading/desk-1", "trading/desk-2"]
        assert len(recordings_of(engine_app)) == 2
        for name in ("trading/desk-1", "trading/desk-2"):
            assert record_calls(plivo, name) == 1
            (recording,) = recordings_of(engine_app, name)
            assert recording.status == Status.RECORDING
            assert recording.started_by == AUTO_RECORD_STARTER
        assert record_calls(plivo, "sales/floor") == 0

        # The notice was spoken to every member of each recorded conference, once.
        spoken = sorted((n["conference"], n["member_ids"], n["text"]) for n in plivo.notices)
        assert spoken == [
            ("trading/desk-1", ["1", "2"], NOTICE),
            ("trading/desk-2", ["1", "2"], NOTICE),
        ]
        assert {n["voice"] for n in plivo.notices} == {"MAN"}

        # A matching conference that appears later is picked up within one interval (2 s) and
        # the workers' poll (1 s).
        plivo.add_conference("trading/desk-3")
        took = wait_for(lambda: "trading/desk-3" in conferences_recorded(), 10)
        assert took < 2 + 1 + 1.5, took
        time.sleep(2.5)
        assert len(recordings_of(engine_app, "trading/desk-3")) == 1
        assert record_calls(plivo, "trading/desk-3") == 1
        assert all(w.running for w in workers)
    except BaseException:
        for worker in workers:
            print(f"===== {worker.name} =====\n{worker.output()}")
        raise
    finally:
        for worker in workers:
            worker.stop()
    output = "".join(w.output() for w in workers)
    assert "auto-record started a recording" in output


# --- one recording however the starts race ------------------------------------------------------


def test_workers_and_the_api_racing_for_a_conference_start_one_recording(
    make_app: AppFactory, plivo: FakePlivo
) -> None:
    app = make_app()
    plivo.add_conference("trading/race")
    barrier = threading.Barrier(6)
    outcomes: list[str] = []
    operator = {"Authorization": f"Bearer {token_for(app, Role.OPERATOR)}"}

    def through_policy() -> None:
        barrier.wait()
        try:
            outcomes.append(start_recording(services(app), "trading/race", "mp3", "policy:test"))
        except AlreadyRecording:
            outcomes.append("409")

    def through_api() -> None:
        client = app.test_client()
        barrier.wait()
        response = client.post("/api/conferences/trading/race/recording", headers=operator)
        outcomes.append(
            "409" if response.status_code == 409 else response.get_json()["recording_id"]
        )

    threads = [threading.Thread(target=through_policy) for _ in range(4)]
    threads += [threading.Thread(target=through_api) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(outcomes).count("409") == 5, outcomes
    assert record_calls(plivo, "trading/race") == 1
    assert len(recordings_of(app, "trading/race")) == 1


def test_a_second_start_through_the_api_is_409_while_recording(
    app: Flask, client: Any, plivo: FakePlivo
) -> None:
    plivo.add_conference("board")
    operator = {"Authorization": f"Bearer {token_for(app, Role.OPERATOR)}"}
    assert client.post("/api/conferences/board/recording", headers=operator).status_code == 201
    again = client.post("/api/conferences/board/recording", headers=operator)
    assert again.status_code == 409
    assert again.get_json()["error"] == "already_recording"
    assert record_calls(plivo, "board") == 1


def test_auto_record_starts_again_once_the_recording_ended_in_a_conference_still_live(
    make_app: AppFactory, plivo: FakePlivo
) -> None:
    app = make_app(AUTO_RECORD="*")
    plivo.add_conference("desk")
    assert auto_record(services(app)).started == 1
    assert auto_record(services(app)).started == 0  # in progress: left alone
    (first,) = recordings_of(app)
    # Stopped by someone while the conference goes on: the callback comes, the row moves on.
    params = plivo.finish_recording(first.recording_id, b"first part")
    assert post_callback(app.test_client(), plivo, params).status_code == 200

    assert auto_record(services(app)).started == 1
    assert [r.status for r in recordings_of(app)] == [Status.PENDING, Status.RECORDING]


def test_a_conference_run_again_under_the_same_name_is_recorded_though_a_callback_was_lost(
    make_app: AppFactory, plivo: FakePlivo
) -> None:
    app = make_app(AUTO_RECORD="*")
    plivo.add_conference("daily")
    assert auto_record(services(app)).started == 1
    plivo.end_conference("daily")  # its callback never arrives: the row stays `recording`
    with services(app).sessions.begin() as session:
        claim = session.get(ConferenceClaim, "daily")
        assert claim is not None
        claim.claimed_at = claim.claimed_at.replace(year=claim.claimed_at.year - 1)
    plivo.add_conference("daily")  # tomorrow's run, just begun

    assert auto_record(services(app)).started == 1
    assert [r.status for r in recordings_of(app)] == [Status.RECORDING, Status.RECORDING]


def test_a_conference_that_ends_before_its_recording_starts_is_not_an_error(
    make_app: AppFactory, plivo: FakePlivo, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(AUTO_RECORD="trading/*")
    plivo.add_conference("trading/brief")
    plivo.api_faults.extend(["pass", 404])  # listed, then gone when its members are read
    result = auto_record(services(app))
    assert (result.matching, result.started, result.failed) == (1, 0, 0)

    plivo.api_faults.extend(["pass", "pass", 404])  # gone when the recording is asked for
    result = auto_record(services(app))
    assert (result.matching, result.started, result.failed) == (1, 0, 0)
    assert recordings_of(app) == []
    with services(app).sessions() as session:
        assert session.scalars(select(ConferenceClaim)).all() == []  # nothing left claimed
    assert "error" not in [r.levelname.lower() for r in caplog.records]

    assert auto_record(services(app)).started == 1  # still live after all: recorded now


# --- the recording notice -----------------------------------------------------------------------


def test_notice_is_spoken_to_every_member_at_start_and_shown_with_the_recording(
    make_app: AppFactory, plivo: FakePlivo
) -> None:
    app = make_app(RECORDING_NOTICE_TEXT=NOTICE, RECORDING_NOTICE_LANGUAGE="en-GB")
    members = plivo.add_conference("board")
    client = app.test_client()
    operator = {"Authorization": f"Bearer {token_for(app, Role.OPERATOR)}"}

    started = client.post("/api/conferences/board/recording", headers=operator)

    assert started.status_code == 201
    assert plivo.notices == [
        {
            "conference": "board",
            "kind": "Speak",
            "member_ids": ["1", "2"],
            "text": NOTICE,
            "voice": "WOMAN",
            "language": "en-GB",
        }
    ]
    body = started.get_json()
    assert [p["notified_at"] is not None for p in body["participants"]] == [True, True]
    assert [(n["member_id"], n["call_uuid"], n["outcome"]) for n in body["notices"]] == [
        (m["member_id"], m["call_uuid"], "played") for m in members
    ]
    compliance = {"Authorization": f"Bearer {token_for(app, Role.COMPLIANCE)}"}
    listed = client.get("/api/recordings?notified=false", headers=compliance).get_json()
    assert listed["recordings"] == []
    listed = client.get("/api/recordings?notified=true", headers=compliance).get_json()
    assert [r["recording_id"] for r in listed["recordings"]] == [body["recording_id"]]


def test_notice_url_is_played(make_app: AppFactory, plivo: FakePlivo) -> None:
    app = make_app(RECORDING_NOTICE_URL="https://example.test/notice.mp3")
    plivo.add_conference("board")
    start_recording(services(app), "board", "mp3", "ops")
    assert [(n["kind"], n["member_ids"], n["url"]) for n in plivo.notices] == [
        ("Play", ["1", "2"], "https://example.test/notice.mp3")
    ]


def test_a_failed_notice_is_visible_and_found_by_the_notified_filter(
    make_app: AppFactory, plivo: FakePlivo
) -> None:
    app = make_app(RECORDING_NOTICE_TEXT=NOTICE)
    plivo.add_conference("board")
    plivo.add_conference("told")
    plivo.notice_faults.append(500)
    failed_id = start_recording(services(app), "board", "mp3", "ops")
    told_id = start_recording(services(app), "told", "mp3", "ops")
    client = app.test_client()
    compliance = {"Authorization": f"Bearer {token_for(app, Role.COMPLIANCE)}"}

    body = client.get(f"/api/recordings/{failed_id}", headers=compliance).get_json()

    assert body["status"] == "recording"  # the recording runs though the notice failed
    assert [p["notified_at"] for p in body["participants"]] == [None, None]
    assert [n["outcome"] for n in body["notices"]] == ["failed", "failed"]
    assert "500" in body["notices"][0]["error"]
    untold = client.get("/api/recordings?notified=false", headers=compliance).get_json()
    assert [r["recording_id"] for r in untold["recordings"]] == [failed_id]
    told = client.get("/api/recordings?notified=true", headers=compliance).get_json()
    assert [r["recording_id"] for r in told["recordings"]] == [told_id]
    export = client.get("/api/recordings/export?notified=false", headers=compliance)
    assert failed_id in export.get_data(as_text=True)
    assert told_id not in export.get_data(as_text=True)
    bad = client.get("/api/recordings?notified=maybe", headers=compliance)
    assert bad.status_code == 400 and bad.get_json()["error"] == "invalid_notified"


def test_a_member_who_enters_later_is_told_once(make_app: AppFactory, plivo: FakePlivo) -> None:
    app = make_app(RECORDING_NOTICE_TEXT=NOTICE)
    plivo.add_conference("board")
    recording_id = start_recording(services(app), "board", "mp3", "ops")
    late = plivo.add_member("board", {"from": "+14155550199", "caller_name": "Late"})

    assert notify_member(services(app), "board", late["member_id"], late["call_uuid"]) == "played"
    assert notify_member(services(app), "board", late["member_id"], late["call_uuid"]) is None

    assert [n["member_ids"] for n in plivo.notices] == [["1", "2"], [late["member_id"]]]
    with services(app).sessions() as session:
        from webhook.recordings import find, to_json

        recording = find(session, recording_id)
        assert recording is not None
        notices = to_json(recording)["notices"]
    assert [(n["member_id"], n["outcome"]) for n in notices][-1] == (late["member_id"], "played")
    # Nothing to do for a conference nobody records, or without a notice set.
    assert notify_member(services(app), "elsewhere", "1") is None
    assert notify_member(services(make_app()), "board", "9") is None


def test_members_there_at_the_start_are_left_to_the_start_while_it_tells_them(
    make_app: AppFactory, plivo: FakePlivo
) -> None:
    """Two workers: one starts a recording (committed, its notice to the members not yet sent);
    the other's chore must not tell those members a second time meanwhile."""
    app = make_app(RECORDING_NOTICE_TEXT=NOTICE)
    svc = services(app)
    members = plivo.add_conference("board")
    with transaction(svc.sessions) as session:
        recording_pk = record_start(
            session,
            recording_id="rec-being-started",
            conference_name="board",
            file_format="mp3",
            api_id=None,
            record_url=None,
            members=members,
            started_by="ops",
        ).id
    assert notify_member(svc, "board", "1") == "waiting"
    assert notify_entered(svc) == 0
    assert plivo.notices == []
    with transaction(svc.sessions) as session:  # nobody marked as told by the waiting chore
        notified = session.scalars(select(ConferenceMember.notified_at)).all()
    assert notified == [None, None]

    # A start that died before telling anyone: after START_NOTICE_SECONDS the chore tells them.
    long_ago = utcnow() - dt.timedelta(seconds=START_NOTICE_SECONDS + 1)
    with transaction(svc.sessions) as session:
        session.execute(
            update(Recording).where(Recording.id == recording_pk).values(created_at=long_ago)
        )
    assert notify_entered(svc) == 2
    assert sorted(n["member_ids"][0] for n in plivo.notices) == ["1", "2"]


def test_a_failed_notice_to_an_entering_member_is_tried_again(
    make_app: AppFactory, plivo: FakePlivo
) -> None:
    app = make_app(RECORDING_NOTICE_TEXT=NOTICE)
    plivo.add_conference("board")
    start_recording(services(app), "board", "mp3", "ops")
    late = plivo.add_member("board", {})
    plivo.notice_faults.append(503)
    assert notify_member(services(app), "board", late["member_id"]) == "failed"
    assert notify_member(services(app), "board", late["member_id"]) == "played"
    assert notify_member(services(app), "board", late["member_id"]) is None


# --- settings -------------------------------------------------------------------------------------


def test_policy_settings_default_to_off() -> None:
    settings = load("/srv", {})
    assert settings.auto_record == ()
    assert settings.auto_record_interval_seconds == 30
    assert settings.recording_notice_text is None and settings.recording_notice_url is None
    assert (settings.recording_notice_voice, settings.recording_notice_language) == (
        "WOMAN",
        "en-US",
    )
    assert settings.delete_from_plivo_after_days is None


def test_policy_settings_are_read() -> None:
    settings = load(
        "/srv",
        {
            "PUBLIC_URL": PUBLIC_URL,
            "AUTO_RECORD": " trading/* , board ",
            "AUTO_RECORD_INTERVAL_SECONDS": "10",
            "RECORDING_NOTICE_TEXT": NOTICE,
            "RECORDING_NOTICE_VOICE": "man",
            "DELETE_FROM_PLIVO_AFTER_DAYS": "0.5",
        },
    )
    assert settings.auto_record == ("trading/*", "board")
    assert settings.auto_record_interval_seconds == 10
    assert settings.recording_notice_voice == "MAN"
    assert settings.delete_from_plivo_after_days == 0.5


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"RECORDING_NOTICE_TEXT": "x", "RECORDING_NOTICE_URL": "https://a.test/n.mp3"},
            "RECORDING_NOTICE_TEXT or RECORDING_NOTICE_URL",
        ),
        ({"RECORDING_NOTICE_URL": "ftp://a.test/n.mp3"}, "RECORDING_NOTICE_URL"),
        ({"RECORDING_NOTICE_VOICE": "ROBOT"}, "RECORDING_NOTICE_VOICE"),
        ({"RECORDING_NOTICE_LANGUAGE": "english please"}, "RECORDING_NOTICE_LANGUAGE"),
        ({"AUTO_RECORD": "*"}, "PUBLIC_URL"),
        ({"AUTO_RECORD_INTERVAL_SECONDS": "0"}, "AUTO_RECORD_INTERVAL_SECONDS"),
        ({"DELETE_FROM_PLIVO_AFTER_DAYS": "-1"}, "DELETE_FROM_PLIVO_AFTER_DAYS"),
        ({"DELETE_FROM_PLIVO_AFTER_DAYS": "soon"}, "DELETE_FROM_PLIVO_AFTER_DAYS"),
        ({"DELETE_FROM_PLIVO_AFTER_DAYS": "nan"}, "DELETE_FROM_PLIVO_AFTER_DAYS"),
    ],
)
def test_policy_misconfiguration_is_refused_naming_the_setting(env, named) -> None:
    with pytest.raises(ConfigError, match=named):
        load("/srv", env)


def test_members_who_enter_after_the_start_are_told_by_a_worker_once(
    make_app: AppFactory, plivo: FakePlivo
) -> None:
    app = make_app(RECORDING_NOTICE_TEXT=NOTICE)
    plivo.add_conference("board")
    recording_id = start_recording(services(app), "board", "mp3", "ops")
    assert [n["member_ids"] for n in plivo.notices] == [["1", "2"]]
    # A caller enters while the conference is recorded; Plivo reports it on the callback URL.
    entered = plivo.join("board", "+14155550199", "+14155550100", "Late")
    answer = post_callback(app.test_client(), plivo, entered)
    assert answer.status_code == 200, answer.get_json()

    worker = Worker(services(app))
    worker._chores()
    late = entered["ConferenceMemberID"]
    assert [n["member_ids"] for n in plivo.notices] == [["1", "2"], [late]]
    # The next turn tells nobody again: those told at the start are only marked.
    with transaction(services(app).sessions) as session:
        session.execute(update(Schedule).values(next_run_at=utcnow()))
    assert notify_entered(services(app)) == 0
    assert len(plivo.notices) == 2
    headers = {"Authorization": f"Bearer {token_for(app, Role.COMPLIANCE)}"}
    shown = app.test_client().get(f"/api/recordings/{recording_id}", headers=headers).get_json()
    told = {n["member_id"]: n["outcome"] for n in shown["notices"]}
    assert told == {"1": "played", "2": "played", late: "played"}


def test_a_notice_that_keeps_failing_for_an_entering_member_is_given_up(
    make_app: AppFactory, plivo: FakePlivo
) -> None:
    app = make_app(RECORDING_NOTICE_TEXT=NOTICE)
    plivo.add_conference("board")
    start_recording(services(app), "board", "mp3", "ops")
    entered = plivo.join("board", "+14155550199", "+14155550100")
    assert post_callback(app.test_client(), plivo, entered).status_code == 200
    plivo.notice_faults.extend([503] * (MAX_FAILED_NOTICES + 2))
    for _ in range(MAX_FAILED_NOTICES + 2):
        assert notify_entered(services(app)) == 0
    asked = MAX_FAILED_NOTICES + 2 - len(plivo.notice_faults)  # each try met one fault
    assert asked == MAX_FAILED_NOTICES
    assert plivo.notices == [n for n in plivo.notices if n["member_ids"] == ["1", "2"]]
