"""The recording callback: signature, validation, idempotent storage and queueing."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

import pytest
from flask import Flask, jsonify, request
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError
from werkzeug.serving import make_server

from tests.conftest import CALLBACK_URL, free_port, post_callback
from tests.fakeplivo import NONCE_HEADER, SIGNATURE_HEADER, FakePlivo
from webhook import callbacks, services
from webhook.db import transaction
from webhook.errors import BadParameter
from webhook.logs import JSONFormatter
from webhook.models import CallbackLog, Participant, Recording, Role, Status
from webhook.recordings import parse_ms

MA_SIGNATURE_HEADER = "X-Plivo-Signature-Ma-V3"
MAIN_AUTH_TOKEN = "main-account-token"


def count(app, model) -> int:
    with services(app).sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def stored(app: Flask) -> dict[str, int]:
    """How many rows the callback path wrote: recordings, and the callback log (with nonces)."""
    return {"recordings": count(app, Recording), "callback_log": count(app, CallbackLog)}


NOTHING = {"recordings": 0, "callback_log": 0}


def the_recording(app: Flask) -> Recording:
    with services(app).sessions() as session:
        return session.scalars(select(Recording)).one()


def callback_logs(app: Flask) -> list[CallbackLog]:
    with services(app).sessions() as session:
        return list(session.scalars(select(CallbackLog).order_by(CallbackLog.id)))


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"error", "message"}
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]


def get_callback(
    client: FlaskClient, plivo: FakePlivo, params: dict[str, str], nonce: str | None = None
) -> Any:
    """GET a callback (params in the query string) signed as Plivo signs a GET."""
    headers = plivo.sign_request("GET", CALLBACK_URL, params, nonce=nonce)
    return client.get("/plivo/recording", query_string=params, headers=headers)


# --- accepted callbacks ---------------------------------------------------------------------------


def test_signed_callback_is_stored_and_queued(app, client, plivo):
    params = plivo.finish_recording("rec-1", b"audio", conference_name="Room 1")
    response = post_callback(client, plivo, params)
    assert response.status_code == 200, response.json
    assert response.json == {"status": "accepted", "recording_id": "rec-1"}
    # Byte for byte what Flask's jsonify gives, as every other answer of the service.
    with app.app_context():
        expected = jsonify({"status": "accepted", "recording_id": "rec-1"})
    assert (response.data, response.mimetype) == (expected.data, expected.mimetype)
    with services(app).sessions() as session:
        recording = session.scalars(select(Recording)).one()
    assert recording.status == Status.PENDING
    assert recording.conference_name == "Room 1"
    assert count(app, CallbackLog) == 1


def test_post_callback_stores_every_reported_field(app, client, plivo):
    params = plivo.finish_recording(
        "rec-fields", b"audio", duration_ms=345100, conference_name="Q3"
    )
    response = post_callback(client, plivo, params)
    assert response.status_code == 200
    recording = the_recording(app)
    assert recording.recording_id == "rec-fields"
    assert recording.conference_name == "Q3"
    assert recording.api_id == params["api_id"]
    assert recording.record_url == params["record_url"] == plivo.media_url("rec-fields")
    assert recording.file_format == "mp3"
    assert recording.duration_ms == 345100
    assert recording.duration_s == 345
    assert recording.start_ms == int(Decimal(params["recording_start_ms"]))
    assert recording.end_ms == int(Decimal(params["recording_end_ms"]))
    assert recording.end_ms - recording.start_ms == 345100
    assert recording.attempts == 0
    assert recording.next_attempt_at is not None
    assert recording.archive_key is None  # named by the worker that archives it
    assert recording.started_by is None


def test_get_callback_with_params_in_query_string_is_accepted(app, client, plivo):
    params = plivo.finish_recording("rec-get", b"audio", conference_name="Room 1 & 2")
    response = get_callback(client, plivo, params)
    assert response.status_code == 200, response.json
    assert response.json == {"status": "accepted", "recording_id": "rec-get"}
    recording = the_recording(app)
    assert recording.status == Status.PENDING
    assert recording.conference_name == "Room 1 & 2"
    assert recording.duration_ms == 5000
    (log,) = callback_logs(app)
    assert log.method == "GET"
    assert log.body == ""
    assert "recording_id=rec-get" in log.query


def test_get_callback_signed_as_post_is_refused(app, client, plivo):
    params = plivo.finish_recording("rec-get-post", b"audio")
    headers = plivo.sign_request("POST", CALLBACK_URL, params)
    response = client.get("/plivo/recording", query_string=params, headers=headers)
    assert_error(response, 403, "bad_signature")
    assert stored(app) == NOTHING


def test_camel_case_callback_from_conference_xml_is_accepted(app, client, plivo):
    params = plivo.finish_recording(
        "rec-camel", b"audio", duration_ms=7000, scheme="camel", conference_name="Xml Room"
    )
    assert "RecordingID" in params and "recording_id" not in params
    response = post_callback(client, plivo, params)
    assert response.status_code == 200, response.json
    assert response.json == {"status": "accepted", "recording_id": "rec-camel"}
    recording = the_recording(app)
    assert recording.status == Status.PENDING
    assert recording.conference_name == "Xml Room"
    assert recording.record_url == params["RecordUrl"]
    assert recording.duration_ms == 7000
    assert recording.start_ms == int(Decimal(params["RecordingStartMs"]))
    assert recording.end_ms == int(Decimal(params["RecordingEndMs"]))


def test_camel_case_callback_by_get_is_accepted(app, client, plivo):
    params = plivo.finish_recording("rec-camel-get", b"audio", scheme="camel")
    response = get_callback(client, plivo, params)
    assert response.status_code == 200, response.json
    assert the_recording(app).recording_id == "rec-camel-get"


def test_camel_case_callback_without_durations_is_accepted(app, client, plivo):
    params = plivo.finish_recording("rec-camel-bare", b"audio", scheme="camel")
    for name in ("RecordingDuration", "RecordingDurationMs", "RecordingStartMs", "RecordingEndMs"):
        del params[name]
    response = post_callback(client, plivo, params)
    assert response.status_code == 200, response.json
    recording = the_recording(app)
    assert recording.status == Status.PENDING
    assert recording.duration_ms is None
    assert recording.start_ms > 0


def test_callback_for_recording_started_through_api_moves_it_to_pending(app, client, plivo, auth):
    members = plivo.add_conference(
        "Board",
        [
            {"from": "14155550101", "to": "14155550100", "caller_name": "Alice"},
            {"from": "sip:bob@example.com", "to": "14155550100", "caller_name": "Bob"},
        ],
    )
    started = client.post(
        "/api/conferences/Board/recording", headers=auth(Role.OPERATOR, name="olivia")
    )
    assert started.status_code == 201, started.json
    recording_id = started.json["recording_id"]
    assert the_recording(app).status == Status.RECORDING

    params = plivo.finish_recording(recording_id, b"audio", duration_ms=9000)
    response = post_callback(client, plivo, params)
    assert response.status_code == 200, response.json
    assert response.json == {"status": "accepted", "recording_id": recording_id}

    with services(app).sessions() as session:
        recording = session.scalars(select(Recording)).one()
        participants = list(session.scalars(select(Participant).order_by(Participant.member_id)))
    assert recording.recording_id == recording_id
    assert recording.status == Status.PENDING
    assert recording.started_by == "olivia"
    assert recording.conference_name == "Board"
    assert recording.duration_ms == 9000
    assert recording.start_ms == int(Decimal(params["recording_start_ms"]))
    assert recording.end_ms == int(Decimal(params["recording_end_ms"]))
    assert recording.api_id is not None
    assert [(p.from_number, p.caller_name, p.call_uuid) for p in participants] == [
        (m["from"], m["caller_name"], m["call_uuid"]) for m in members
    ]

    again = post_callback(client, plivo, params)
    assert again.status_code == 200
    assert again.json["status"] == "duplicate"
    assert count(app, Recording) == 1
    assert count(app, Participant) == 2


def test_callback_for_recording_never_started_through_api_creates_it(app, client, plivo):
    params = plivo.finish_recording("console-rec", b"audio", conference_name="Console")
    response = post_callback(client, plivo, params)
    assert response.status_code == 200
    assert response.json["status"] == "accepted"
    recording = the_recording(app)
    assert recording.status == Status.PENDING
    assert recording.started_by is None
    assert count(app, Participant) == 0


def test_wav_record_url_sets_the_file_format(app, client, plivo):
    params = plivo.finish_recording("rec-wav", b"audio")
    params["record_url"] = plivo.media_url("rec-wav", "wav")
    response = post_callback(client, plivo, params)
    assert response.status_code == 200
    recording = the_recording(app)
    assert recording.file_format == "wav"


# --- duplicates and replays -----------------------------------------------------------------------


def test_duplicate_with_fresh_nonce_answers_duplicate_and_keeps_one_row(app, client, plivo):
    params = plivo.finish_recording("rec-dup", b"audio")
    first = post_callback(client, plivo, params)
    second = post_callback(client, plivo, params)
    assert first.status_code == 200
    assert first.json["status"] == "accepted"
    assert second.status_code == 200
    assert second.json == {"status": "duplicate", "recording_id": "rec-dup"}
    assert count(app, Recording) == 1
    logs = callback_logs(app)
    assert [log.duplicate for log in logs] == [False, True]
    assert [log.recording_id for log in logs] == ["rec-dup", "rec-dup"]
    assert logs[0].nonce != logs[1].nonce


def test_duplicate_does_not_requeue_an_archived_recording(app, client, plivo):
    params = plivo.finish_recording("rec-done", b"audio")
    assert post_callback(client, plivo, params).status_code == 200
    with transaction(services(app).sessions) as session:
        session.execute(update(Recording).values(status=Status.ARCHIVED, attempts=1))
    again = post_callback(client, plivo, params)
    assert again.status_code == 200
    assert again.json["status"] == "duplicate"
    recording = the_recording(app)
    assert recording.status == Status.ARCHIVED
    assert recording.attempts == 1


def test_same_nonce_again_is_refused_as_replay(app, client, plivo):
    params = plivo.finish_recording("rec-replay", b"audio")
    first = post_callback(client, plivo, params, nonce="12345678901234567890")
    assert first.status_code == 200
    replay = post_callback(client, plivo, params, nonce="12345678901234567890")
    assert_error(replay, 403, "replayed_nonce")
    assert stored(app) == {"recordings": 1, "callback_log": 1}


def test_replayed_nonce_is_refused_even_for_another_recording(app, client, plivo):
    first = plivo.finish_recording("rec-n1", b"audio")
    other = plivo.finish_recording("rec-n2", b"audio")
    assert post_callback(client, plivo, first, nonce="424242").status_code == 200
    assert_error(post_callback(client, plivo, other, nonce="424242"), 403, "replayed_nonce")
    assert the_recording(app).recording_id == "rec-n1"
    assert count(app, CallbackLog) == 1


# --- signatures -----------------------------------------------------------------------------------


def test_signature_with_wrong_token_is_refused_and_nothing_stored(app, client, plivo):
    params = plivo.finish_recording("rec-forged", b"audio")
    headers = plivo.sign_request("POST", CALLBACK_URL, params, auth_token="not-the-token")
    response = client.post("/plivo/recording", data=params, headers=headers)
    assert_error(response, 403, "bad_signature")
    assert stored(app) == NOTHING


@pytest.mark.parametrize(
    "dropped", [SIGNATURE_HEADER, NONCE_HEADER, "both"], ids=["no-signature", "no-nonce", "none"]
)
def test_missing_signature_headers_are_refused_and_nothing_stored(app, client, plivo, dropped):
    params = plivo.finish_recording("rec-unsigned", b"audio")
    headers = plivo.sign_request("POST", CALLBACK_URL, params)
    for header in (SIGNATURE_HEADER, NONCE_HEADER) if dropped == "both" else (dropped,):
        del headers[header]
    response = client.post("/plivo/recording", data=params, headers=headers)
    assert_error(response, 403, "missing_signature")
    assert stored(app) == NOTHING


def test_empty_signature_header_is_refused(app, client, plivo):
    params = plivo.finish_recording("rec-empty-sig", b"audio")
    headers = plivo.sign_request("POST", CALLBACK_URL, params)
    headers[SIGNATURE_HEADER] = ""
    assert_error(
        client.post("/plivo/recording", data=params, headers=headers), 403, "missing_signature"
    )
    assert stored(app) == NOTHING


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("recording_id", "rec-other"),
        ("record_url", "https://media.plivo.com/v1/Account/X/Recording/other.mp3"),
        ("recording_duration_ms", "1.00000"),
    ],
)
def test_tampered_param_is_refused_and_nothing_stored(app, client, plivo, field, value):
    params = plivo.finish_recording("rec-tamper", b"audio")
    headers = plivo.sign_request("POST", CALLBACK_URL, params)
    response = client.post("/plivo/recording", data={**params, field: value}, headers=headers)
    assert_error(response, 403, "bad_signature")
    assert stored(app) == NOTHING


def test_added_param_is_refused(app, client, plivo):
    params = plivo.finish_recording("rec-extra", b"audio")
    headers = plivo.sign_request("POST", CALLBACK_URL, params)
    response = client.post("/plivo/recording", data={**params, "extra": "1"}, headers=headers)
    assert_error(response, 403, "bad_signature")
    assert stored(app) == NOTHING


@pytest.mark.parametrize(
    "signed_url",
    [
        "http://archive.example.test/plivo/recording",
        "https://other.example.test/plivo/recording",
        "https://archive.example.test:8443/plivo/recording",
        "https://archive.example.test/plivo/other",
    ],
    ids=["http-not-https", "other-host", "other-port", "other-path"],
)
def test_signature_over_another_url_is_refused(app, client, plivo, signed_url):
    params = plivo.finish_recording("rec-url", b"audio")
    headers = plivo.sign_request("POST", signed_url, params)
    response = client.post("/plivo/recording", data=params, headers=headers)
    assert_error(response, 403, "bad_signature")
    assert stored(app) == NOTHING


def test_signature_is_checked_against_public_url_not_the_socket(app, client, plivo):
    """Behind a TLS-terminating router the request arrives as plain http on another host."""
    params = plivo.finish_recording("rec-router", b"audio")
    headers = plivo.sign_request("POST", CALLBACK_URL, params)
    response = client.post(
        "/plivo/recording", data=params, headers=headers, base_url="http://10.0.0.5:5000"
    )
    assert response.status_code == 200, response.json
    assert count(app, Recording) == 1


def test_signature_matching_the_socket_url_but_not_public_url_is_refused(app, client, plivo):
    params = plivo.finish_recording("rec-socket", b"audio")
    headers = plivo.sign_request("POST", "http://localhost/plivo/recording", params)
    response = client.post("/plivo/recording", data=params, headers=headers)
    assert_error(response, 403, "bad_signature")
    assert stored(app) == NOTHING


def test_one_right_signature_among_several_comma_separated_is_accepted(app, client, plivo):
    params = plivo.finish_recording("rec-multi", b"audio")
    headers = plivo.sign_request("POST", CALLBACK_URL, params)
    wrong = plivo.sign_request("POST", CALLBACK_URL, params, auth_token="old-token")
    headers[SIGNATURE_HEADER] = f"{wrong[SIGNATURE_HEADER]}, {headers[SIGNATURE_HEADER]},bogus"
    response = client.post("/plivo/recording", data=params, headers=headers)
    assert response.status_code == 200, response.json
    assert callback_logs(app)[0].signature_verdict == "v3"
    assert count(app, Recording) == 1


def test_several_signatures_none_right_are_refused(app, client, plivo):
    params = plivo.finish_recording("rec-multi-bad", b"audio")
    headers = plivo.sign_request("POST", CALLBACK_URL, params)
    one = plivo.sign_request("POST", CALLBACK_URL, params, auth_token="a", nonce="1")
    two = plivo.sign_request("POST", CALLBACK_URL, params, auth_token="b", nonce="1")
    headers[SIGNATURE_HEADER] = f"{one[SIGNATURE_HEADER]},{two[SIGNATURE_HEADER]}"
    assert_error(
        client.post("/plivo/recording", data=params, headers=headers), 403, "bad_signature"
    )
    assert stored(app) == NOTHING


def ma_v3_headers(plivo: FakePlivo, params: dict[str, str], token: str) -> dict[str, str]:
    headers = plivo.sign_request("POST", CALLBACK_URL, params, auth_token=token)
    return {
        MA_SIGNATURE_HEADER: headers.pop(SIGNATURE_HEADER),
        NONCE_HEADER: headers[NONCE_HEADER],
    }


def test_ma_v3_signature_is_accepted_when_main_token_configured(make_app, plivo):
    app = make_app(PLIVO_MAIN_AUTH_TOKEN=MAIN_AUTH_TOKEN)
    params = plivo.finish_recording("rec-ma", b"audio")
    headers = ma_v3_headers(plivo, params, MAIN_AUTH_TOKEN)
    response = app.test_client().post("/plivo/recording", data=params, headers=headers)
    assert response.status_code == 200, response.json
    assert response.json["status"] == "accepted"
    (log,) = callback_logs(app)
    assert log.signature_verdict == "ma-v3"
    assert log.headers[MA_SIGNATURE_HEADER] == headers[MA_SIGNATURE_HEADER]


def test_ma_v3_signature_with_subaccount_token_is_refused(make_app, plivo):
    app = make_app(PLIVO_MAIN_AUTH_TOKEN=MAIN_AUTH_TOKEN)
    params = plivo.finish_recording("rec-ma-wrong", b"audio")
    headers = ma_v3_headers(plivo, params, plivo.auth_token)
    response = app.test_client().post("/plivo/recording", data=params, headers=headers)
    assert_error(response, 403, "bad_signature")
    assert stored(app) == NOTHING


def test_ma_v3_signature_is_refused_without_main_token_configured(app, client, plivo):
    params = plivo.finish_recording("rec-ma-none", b"audio")
    headers = ma_v3_headers(plivo, params, MAIN_AUTH_TOKEN)
    response = client.post("/plivo/recording", data=params, headers=headers)
    assert_error(response, 403, "bad_signature")
    assert stored(app) == NOTHING


def test_v3_signature_still_accepted_when_main_token_configured(make_app, plivo):
    app = make_app(PLIVO_MAIN_AUTH_TOKEN=MAIN_AUTH_TOKEN)
    params = plivo.finish_recording("rec-v3-with-ma", b"audio")
    response = post_callback(app.test_client(), plivo, params)
    assert response.status_code == 200
    assert callback_logs(app)[0].signature_verdict == "v3"


# --- malformed fields -----------------------------------------------------------------------------


def _without(name: str):
    return lambda params: params.pop(name)


def _set(name: str, value: str):
    return lambda params: params.__setitem__(name, value)


def _end_before_start(params: dict[str, str]) -> None:
    start = int(Decimal(params["recording_start_ms"]))
    params["recording_end_ms"] = str(start - 1000)


MALFORMED = [
    ("missing-recording-id", _without("recording_id"), "recording_id"),
    ("empty-recording-id", _set("recording_id", "  "), "recording_id"),
    ("recording-id-with-slash", _set("recording_id", "abc/def"), "recording_id"),
    ("recording-id-dot-dot", _set("recording_id", "../etc"), "recording_id"),
    ("recording-id-65-chars", _set("recording_id", "a" * 65), "recording_id"),
    ("recording-id-control-char", _set("recording_id", "abc\x00def"), "recording_id"),
    ("missing-record-url", _without("record_url"), "record_url"),
    ("relative-record-url", _set("record_url", "/v1/Recording/x.mp3"), "record_url"),
    ("record-url-without-host", _set("record_url", "https:///x.mp3"), "record_url"),
    ("non-numeric-duration-ms", _set("recording_duration_ms", "abc"), "recording_duration_ms"),
    ("negative-duration-ms", _set("recording_duration_ms", "-5"), "recording_duration_ms"),
    (
        "absurd-duration-ms",
        _set("recording_duration_ms", str(7 * 24 * 3600 * 1000 + 1)),
        "recording_duration_ms",
    ),
    (
        "huge-exponent-duration-ms",
        _set("recording_duration_ms", "1e999999999"),
        "recording_duration_ms",
    ),
    (
        "giant-int-duration-ms",
        _set("recording_duration_ms", "1e999999"),
        "recording_duration_ms",
    ),
    ("non-numeric-duration-s", _set("recording_duration", "ten"), "recording_duration"),
    ("absurd-duration-s", _set("recording_duration", "1000000"), "recording_duration"),
    ("nan-duration-ms", _set("recording_duration_ms", "NaN"), "recording_duration_ms"),
    ("infinite-duration-ms", _set("recording_duration_ms", "Infinity"), "recording_duration_ms"),
    ("signalling-nan-duration-s", _set("recording_duration", "sNaN"), "recording_duration"),
    ("start-not-epoch-ms", _set("recording_start_ms", "1700000000"), "recording_start_ms"),
    ("start-in-year-2200", _set("recording_start_ms", "7258118400000"), "recording_start_ms"),
    ("negative-start", _set("recording_start_ms", "-1"), "recording_start_ms"),
    ("nan-start", _set("recording_start_ms", "nan"), "recording_start_ms"),
    ("infinite-end", _set("recording_end_ms", "-Infinity"), "recording_end_ms"),
    ("end-before-start", _end_before_start, "recording_end_ms"),
    ("over-long-conference-name", _set("conference_name", "c" * 256), "conference_name"),
]


def test_each_malformed_field_is_refused_naming_it_and_nothing_stored(app, client, plivo):
    # One app for every case (each is refused, so none leaves a row behind); a failure names
    # every case that went wrong, not only the first.
    wrong = {}
    for case, change, field in MALFORMED:
        params = plivo.finish_recording("rec-bad", b"audio")
        change(params)
        response = post_callback(client, plivo, params)
        body = response.get_json(silent=True) or {}
        if (response.status_code, body.get("error")) != (400, f"invalid_{field}") or set(body) != {
            "error",
            "message",
        }:
            wrong[case] = (response.status_code, body)
    assert wrong == {}
    assert stored(app) == NOTHING


def test_kept_headers_are_what_the_request_headers_say(app) -> None:
    """The log keeps each kept header as werkzeug's view of the request shows it: an empty
    Content-Type or Content-Length is absent, an empty User-Agent is kept, a GET has neither."""

    def as_request_headers_show() -> dict[str, str]:
        wanted = {name.lower(): name for name in callbacks.KEPT_HEADERS}
        shown: dict[str, str] = {}
        for name, value in request.headers.items():
            if name.lower() in wanted:
                shown.setdefault(wanted[name.lower()], value)
        return shown

    cases = [
        {"REQUEST_METHOD": "GET"},
        {"REQUEST_METHOD": "POST", "CONTENT_TYPE": "", "CONTENT_LENGTH": ""},
        {
            "REQUEST_METHOD": "POST",
            "CONTENT_TYPE": "application/x-www-form-urlencoded",
            "CONTENT_LENGTH": "12",
            "HTTP_USER_AGENT": "",
            "HTTP_X_PLIVO_SIGNATURE_V3": "sig",
            "HTTP_X_PLIVO_SIGNATURE_V3_NONCE": "123",
            "HTTP_X_FORWARDED_FOR": "203.0.113.9,198.51.100.1",
            "HTTP_COOKIE": "session=secret",
        },
    ]
    for environ in cases:
        with app.test_request_context("/plivo/recording", environ_overrides=environ):
            assert callbacks.kept_headers(request.environ) == as_request_headers_show(), environ


def test_each_log_line_carries_its_own_time_in_utc() -> None:
    """Times are formatted once a second: lines on both sides of a second's edge, and a late
    line from the second before, each carry their own."""
    formatter = JSONFormatter()
    second = 1_767_225_599
    for created in (second + 0.999, second + 1.0, second + 0.5, second + 86_400.25):
        record = logging.makeLogRecord({"msg": "request", "created": created})
        record.msecs = (created - int(created)) * 1000
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(created)))
        expected = f"{stamp}.{int(record.msecs):03d}Z"
        assert json.loads(formatter.format(record))["ts"] == expected


def _parse_ms_by_decimal(text: str, scale: int, bounds: tuple[int, int]) -> int | str | None:
    """What parse_ms answers, worked out with Decimal alone: the value, None, or "refused"."""
    raw = text.strip()
    if not raw:
        return None
    try:
        number = Decimal(raw)
    except InvalidOperation:
        return "refused"
    if not number.is_finite() or number.adjusted() > 18:
        return "refused"
    value = int(number * scale)
    return value if bounds[0] <= value <= bounds[1] else "refused"


@pytest.mark.parametrize("scale", [1, 1000])
def test_plain_numbers_read_as_decimals_would_read_them(scale: int) -> None:
    """The common forms ("345100", "345100.00000") take a shorter road than Decimal: each text
    gives the very value, or the very refusal, that Decimal gives."""
    texts = [
        "0", "7", "345100", "345100.00000", "345100.", "345100.0001", "345100.5", " 12 ", "0012",
        "00000000000000000000012", "999999999999999999", "9999999999999999999", "1767225600000",
        "1767225600000.00000", "-5", "+5", "1_000", "1e3", ".5", "5.", "12.0a", "12.00 0",
        "\u0661\u0662", "12.\u0660", "\u00b2", "", "  ", "1.", "0.000", "604800000",
        "604800001", "604800", "604801",
    ]  # fmt: skip
    wrong = {}
    for bounds in [(0, 7 * 24 * 3600 * 1000), (946684800000, 4102444800000)]:
        for text in texts:
            try:
                got: int | str | None = parse_ms("field", text, scale, bounds)
            except BadParameter:
                got = "refused"
            expected = _parse_ms_by_decimal(text, scale, bounds)
            if got != expected:
                wrong[(text, bounds)] = (got, expected)
    assert wrong == {}


def test_malformed_get_callback_is_refused_naming_the_field(app, client, plivo):
    params = plivo.finish_recording("rec-bad-get", b"audio")
    params["recording_duration_ms"] = "12 minutes"
    assert_error(get_callback(client, plivo, params), 400, "invalid_recording_duration_ms")
    assert stored(app) == NOTHING


def test_malformed_camel_case_field_is_refused_under_its_canonical_name(app, client, plivo):
    params = plivo.finish_recording("rec-bad-camel", b"audio", scheme="camel")
    params["RecordingID"] = "bad/id"
    assert_error(post_callback(client, plivo, params), 400, "invalid_recording_id")
    assert stored(app) == NOTHING


def test_refused_malformed_callback_does_not_burn_its_nonce(app, client, plivo):
    """Plivo's retry of a refused callback reuses nothing stored: the fixed one goes through."""
    params = plivo.finish_recording("rec-fixed", b"audio")
    bad = {**params, "recording_duration_ms": "oops"}
    assert post_callback(client, plivo, bad, nonce="777").status_code == 400
    assert post_callback(client, plivo, params, nonce="777").status_code == 200
    assert count(app, Recording) == 1


def test_boundary_values_are_accepted(app, client, plivo):
    params = plivo.finish_recording("a" * 64, b"audio")
    params["recording_duration_ms"] = str(7 * 24 * 3600 * 1000)
    params["recording_duration"] = "0"
    params["recording_end_ms"] = params["recording_start_ms"]
    response = post_callback(client, plivo, params)
    assert response.status_code == 200, response.json
    recording = the_recording(app)
    assert recording.recording_id == "a" * 64
    assert recording.duration_ms == 7 * 24 * 3600 * 1000
    assert recording.end_ms == recording.start_ms


# --- limits, configuration, database --------------------------------------------------------------


def test_body_over_default_limit_is_refused_with_413(app, client, plivo):
    params = plivo.finish_recording("rec-big", b"audio")
    params["padding"] = "x" * (64 * 1024)
    response = post_callback(client, plivo, params)
    assert_error(response, 413, "request_entity_too_large")
    assert stored(app) == NOTHING


def test_body_limit_follows_max_callback_bytes(make_app, plivo):
    app = make_app(MAX_CALLBACK_BYTES="2048")
    client = app.test_client()
    params = plivo.finish_recording("rec-limit", b"audio")
    big = {**params, "padding": "x" * 2048}
    assert_error(post_callback(client, plivo, big), 413, "request_entity_too_large")
    assert stored(app) == NOTHING
    assert post_callback(client, plivo, params).status_code == 200
    assert count(app, Recording) == 1


@pytest.mark.parametrize("missing", ["PLIVO_AUTH_TOKEN", "PUBLIC_URL"])
def test_callbacks_refused_with_503_until_configured(make_app, plivo, missing):
    # PLIVO_AUTH_ID without its token is refused at start, so both go together.
    unset = ["PLIVO_AUTH_ID", "PLIVO_AUTH_TOKEN"] if missing == "PLIVO_AUTH_TOKEN" else [missing]
    app = make_app(**dict.fromkeys(unset, ""))
    params = plivo.finish_recording("rec-unconfigured", b"audio")
    response = post_callback(app.test_client(), plivo, params)
    assert_error(response, 503, "callbacks_not_configured")
    assert stored(app) == NOTHING


def test_database_down_answers_503_never_200(make_app, plivo):
    app = make_app(database=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    params = plivo.finish_recording("rec-db-down", b"audio")
    response = post_callback(app.test_client(), plivo, params)
    assert_error(response, 503, "database_unavailable")
    assert response.headers.get("Retry-After")


# --- concurrency ----------------------------------------------------------------------------------


@pytest.fixture
def served(app: Flask) -> Iterator[str]:
    """The app behind a real threaded HTTP server; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.port}"
    server.shutdown()
    thread.join()
    server.server_close()


def test_simultaneous_duplicates_store_one_row_and_all_get_200(app, plivo, served):
    params = plivo.finish_recording("rec-race", b"audio")
    workers = 8
    barrier = threading.Barrier(workers)
    answers: list[tuple[int, dict[str, Any]]] = []
    lock = threading.Lock()

    def deliver() -> None:
        barrier.wait()
        response = plivo.send_callback(served + "/plivo/recording", params, sign_url=CALLBACK_URL)
        with lock:
            answers.append((response.status_code, response.json()))

    threads = [threading.Thread(target=deliver) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(answers) == workers
    assert [status for status, _ in answers] == [200] * workers, answers
    statuses = sorted(body["status"] for _, body in answers)
    assert statuses == ["accepted"] + ["duplicate"] * (workers - 1)
    assert count(app, Recording) == 1
    logs = callback_logs(app)
    assert len(logs) == workers
    assert sum(not log.duplicate for log in logs) == 1
    assert the_recording(app).status == Status.PENDING


def test_simultaneous_callbacks_for_api_started_recording_move_it_once(
    app, client, plivo, served, auth
):
    plivo.add_conference("Race Room")
    started = client.post("/api/conferences/Race%20Room/recording", headers=auth(Role.OPERATOR))
    assert started.status_code == 201
    params = plivo.finish_recording(started.json["recording_id"], b"audio")
    workers = 6
    barrier = threading.Barrier(workers)
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def deliver() -> None:
        barrier.wait()
        response = plivo.send_callback(served + "/plivo/recording", params, sign_url=CALLBACK_URL)
        with lock:
            answers.append({"code": response.status_code, **response.json()})

    threads = [threading.Thread(target=deliver) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [a["code"] for a in answers] == [200] * workers, answers
    assert sorted(a["status"] for a in answers) == ["accepted"] + ["duplicate"] * (workers - 1)
    recording = the_recording(app)
    assert recording.status == Status.PENDING
    assert count(app, Participant) == 2


# --- the callback log -----------------------------------------------------------------------------


def test_callback_log_keeps_body_headers_verdict_and_remote_address(app, client, plivo):
    params = plivo.finish_recording("rec-log", b"audio", conference_name="Log Room")
    headers = plivo.sign_request("POST", CALLBACK_URL, params)
    response = client.post(
        "/plivo/recording",
        data=params,
        headers={
            **headers,
            "User-Agent": "PlivoHTTP/1.0",
            "X-Forwarded-For": "203.0.113.9",
            "Cookie": "session=secret",
        },
        environ_base={"REMOTE_ADDR": "198.51.100.7"},
    )
    assert response.status_code == 200
    (log,) = callback_logs(app)
    assert log.recording_id == "rec-log"
    assert log.method == "POST"
    assert log.remote_addr == "198.51.100.7"
    assert log.signature_verdict == "v3"
    assert log.nonce == headers[NONCE_HEADER]
    assert log.duplicate is False
    assert log.received_at is not None
    assert log.headers[SIGNATURE_HEADER] == headers[SIGNATURE_HEADER]
    assert log.headers[NONCE_HEADER] == headers[NONCE_HEADER]
    assert log.headers["User-Agent"] == "PlivoHTTP/1.0"
    assert log.headers["X-Forwarded-For"] == "203.0.113.9"
    assert log.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert "Cookie" not in log.headers
    assert set(log.headers) == {
        SIGNATURE_HEADER,
        NONCE_HEADER,
        "User-Agent",
        "X-Forwarded-For",
        "Content-Type",
        "Content-Length",
    }
    # The raw body, exactly as sent: it decodes back to the very params that were signed.
    assert dict(parse_qsl(log.body)) == params
    assert "recording_id=rec-log" in log.body
    assert log.query == ""


def test_callback_log_is_append_only(app, client, plivo):
    params = plivo.finish_recording("rec-append", b"audio")
    assert post_callback(client, plivo, params).status_code == 200
    with (
        pytest.raises(DBAPIError, match="append-only"),
        transaction(services(app).sessions) as session,
    ):
        session.execute(update(CallbackLog).values(body="rewritten"))
    assert callback_logs(app)[0].body != "rewritten"


# --- routing --------------------------------------------------------------------------------------


def test_other_methods_on_callback_path_get_405_json(client):
    response = client.put("/plivo/recording")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_conference_member_events_on_an_xml_callback_url_are_logged_not_recordings(
    app, client, plivo
):
    params = {
        "ConferenceAction": "enter",
        "ConferenceName": "Room 1",
        "ConferenceUUID": "c-1",
        "ConferenceMemberID": "7",
        "CallUUID": "call-1",
    }
    response = post_callback(client, plivo, params)
    assert response.status_code == 200
    assert response.json == {"status": "accepted", "conference_action": "enter"}
    assert count(app, Recording) == 0
    [logged] = callback_logs(app)
    assert (logged.kind, logged.recording_id) == ("member", None)
    assert dict(parse_qsl(logged.body)) == params


def test_conference_member_events_still_need_a_signature(app, client, plivo):
    response = client.post("/plivo/recording", data={"ConferenceAction": "exit"})
    assert response.status_code == 403


# --- one door: only signed fields are read --------------------------------------------------------


def test_head_with_a_get_signature_and_an_unsigned_body_is_not_a_callback(app, client, plivo):
    query = plivo.finish_recording("rec-head", b"audio")
    camel = {"RecordingID": query["recording_id"], "RecordUrl": query["record_url"]}
    headers = plivo.sign_request("GET", CALLBACK_URL, camel)
    response = client.head(
        "/plivo/recording",
        query_string=camel,
        data={"record_url": "https://media.plivo.com/planted.mp3", "conference_name": "planted"},
        headers=headers,
    )
    assert response.status_code == 405
    assert stored(app) == NOTHING


def test_get_callback_reads_only_the_signed_query_and_logs_the_unsigned_body(app, client, plivo):
    query = plivo.finish_recording("rec-get-body", b"audio")
    camel = {"RecordingID": query["recording_id"], "RecordUrl": query["record_url"]}
    headers = plivo.sign_request("GET", CALLBACK_URL, camel)
    planted = "record_url=https%3A%2F%2Fmedia.plivo.com%2Fplanted.mp3&conference_name=planted"
    response = client.get(
        "/plivo/recording",
        query_string=camel,
        data=planted,
        content_type="application/x-www-form-urlencoded",
        headers=headers,
    )
    assert response.status_code == 200, response.get_json()
    recording = the_recording(app)
    assert recording.record_url == query["record_url"]
    assert recording.conference_name is None
    [logged] = callback_logs(app)
    assert logged.method == "GET"
    assert logged.body == planted  # what arrived, though none of it was used


@pytest.mark.parametrize(
    ("camel", "snake"),
    [("RecordUrl", "record_url"), ("ConferenceName", "conference_name")],
)
def test_a_field_may_not_override_its_signed_twin_of_the_other_naming(
    app, client, plivo, camel, snake
):
    params = plivo.finish_recording("rec-twins", b"audio")
    params = {**params, camel: params.get(snake) or "Room", snake: "https://media.plivo.com/b.mp3"}
    response = post_callback(client, plivo, params)
    assert_error(response, 400, f"invalid_{snake}")
    assert stored(app) == NOTHING


def test_identical_twins_of_both_namings_are_accepted(app, client, plivo):
    params = plivo.finish_recording("rec-same-twins", b"audio")
    response = post_callback(client, plivo, {**params, "RecordUrl": params["record_url"]})
    assert response.status_code == 200, response.get_json()


def test_a_field_in_both_the_signed_query_and_body_with_different_values_is_refused(
    app, client, plivo
):
    params = plivo.finish_recording("rec-query-body", b"audio")
    url = CALLBACK_URL + "?record_url=https%3A%2F%2Fmedia.plivo.com%2Fother.mp3"
    headers = plivo.sign_request("POST", url, params)
    response = client.post(
        "/plivo/recording",
        query_string={"record_url": "https://media.plivo.com/other.mp3"},
        data=params,
        headers=headers,
    )
    assert_error(response, 400, "invalid_record_url")
    assert stored(app) == NOTHING


def test_a_repeated_field_with_different_values_is_refused(app, client, plivo):
    params = plivo.finish_recording("rec-repeated", b"audio")
    body = {**params, "recording_id": ["rec-repeated", "rec-other"]}
    headers = plivo.sign_request("POST", CALLBACK_URL, body)
    response = client.post("/plivo/recording", data=body, headers=headers)
    assert_error(response, 400, "invalid_recording_id")
    assert stored(app) == NOTHING


def test_a_bad_signature_is_logged_with_the_url_it_was_checked_against(
    make_app, plivo, caplog, monkeypatch
) -> None:
    # The operator's mistake: PUBLIC_URL names another host than the one Plivo calls.
    app = make_app(PUBLIC_URL="https://wrong-host.example.test")
    params = plivo.finish_recording("rec-wrong-host", b"audio")
    # Once a CLI command has configured logging, the service's logger stops propagating.
    monkeypatch.setattr(logging.getLogger("webhook"), "propagate", True)
    response = post_callback(app.test_client(), plivo, params)
    assert_error(response, 403, "bad_signature")
    (refusal,) = [r for r in caplog.records if r.getMessage() == "callback refused"]
    assert refusal.checked_url == "https://wrong-host.example.test/plivo/recording"
    assert plivo.auth_token not in repr(vars(refusal))
    assert stored(app) == NOTHING
