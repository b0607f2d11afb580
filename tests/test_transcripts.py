"""Transcripts: received through the signed callback once per recording in either order, shown
with the recording and on their own (audited), and found with `q` on both databases alike."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from tests.conftest import MP3_TAG, TRANSCRIPTION_URL, post_callback, post_transcription, token_for
from webhook import services
from webhook.db import transaction
from webhook.fulltext import fts5_expression, parse_query
from webhook.models import AuditRecording, CallbackLog, Role, Transcript
from webhook.transcripts import transcript_document

GUARANTEED = "Speaker 0: I can promise you a guaranteed return on this fund.\nSpeaker 1: Noted."
WEATHER = "Speaker 0: the weather in London is grey today, the return flight is late."
BONDS = "Speaker 0: we sell treasury bonds and nothing is guaranteed here."
ACCENTED = "Speaker 0: le café à Zürich, déjà vu, naïve façade.\n"
CJK = "Speaker 0: 会議 東京 確認 済み"


@pytest.fixture
def compliance(auth: Any) -> dict[str, str]:
    return auth(Role.COMPLIANCE)


def rows(app: Flask, model: Any, **where: Any) -> list[Any]:
    with transaction(services(app).sessions) as session:
        query = select(model)
        for name, value in where.items():
            query = query.where(getattr(model, name) == value)
        return list(session.scalars(query))


def record(client: Any, plivo: Any, recording_id: str, conference: str = "Desk") -> None:
    params = plivo.finish_recording(recording_id, MP3_TAG, conference_name=conference)
    answer = post_callback(client, plivo, params)
    assert answer.status_code == 200, answer.json


def transcribe(client: Any, plivo: Any, recording_id: str, text: str, **extra: Any) -> Any:
    params = plivo.transcribe(recording_id, text, **extra)
    return post_transcription(client, plivo, params)


def found(client: Any, headers: dict[str, str], q: str, **filters: str) -> list[str]:
    answer = client.get("/api/recordings", query_string={"q": q, **filters}, headers=headers)
    assert answer.status_code == 200, answer.json
    return sorted(r["recording_id"] for r in answer.json["recordings"])


def marked(snippet: str) -> list[str]:
    """The words a snippet marks (FTS5 marks a phrase as one span, PostgreSQL word by word)."""
    return [word for span in re.findall("«([^»]*)»", snippet) for word in span.split()]


# --- receiving ---------------------------------------------------------------------------------


def test_transcripts_before_and_after_the_recording_callback_are_both_kept(
    app, client, plivo, compliance
):
    # Before: the transcript comes first, the recording after it.
    early = transcribe(client, plivo, "rec-early", GUARANTEED)
    assert early.status_code == 200, early.json
    assert early.json == {"status": "accepted", "recording_id": "rec-early"}
    record(client, plivo, "rec-early")
    # After: the recording first.
    record(client, plivo, "rec-late")
    assert transcribe(client, plivo, "rec-late", WEATHER).status_code == 200

    for recording_id, text in (("rec-early", GUARANTEED), ("rec-late", WEATHER)):
        shown = client.get(f"/api/recordings/{recording_id}", headers=compliance).json
        transcript = shown["transcript"]
        assert transcript["status"] == "received"
        assert transcript["chars"] == len(text)
        assert transcript["error"] is None
        full = client.get(f"/api/recordings/{recording_id}/transcript", headers=compliance)
        assert full.status_code == 200
        assert full.json["text"] == text
        assert full.json["sha256"] == transcript["sha256"]
        assert full.json["source"] == "callback"
        assert full.json["plivo"]["transcription_charge"] == "0.05"
        # The digest on file is the digest of the document that will be archived.
        (row,) = rows(app, Transcript, recording_id=recording_id)
        with transaction(services(app).sessions) as session:
            row = session.get(Transcript, row.id)
            body = transcript_document(row)
        assert hashlib.sha256(body).hexdigest() == transcript["sha256"]
        assert json.loads(body)["transcription"] == text
    logged = rows(app, CallbackLog, kind="transcription")
    assert sorted(row.recording_id for row in logged) == ["rec-early", "rec-late"]


def test_a_duplicate_transcription_callback_stores_one_transcript(app, client, plivo):
    params = plivo.transcribe("rec-dup", GUARANTEED)
    answers = [post_transcription(client, plivo, params) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json["status"] for a in answers] == ["accepted", "duplicate"]
    # A later, different transcript of the same recording does not replace the first.
    other = post_transcription(client, plivo, {**params, "transcription": "something else"})
    assert other.json["status"] == "duplicate"
    assert len(rows(app, Transcript, recording_id="rec-dup")) == 1
    logged = rows(app, CallbackLog, recording_id="rec-dup")
    assert sorted(row.duplicate for row in logged) == [False, True, True]
    assert {row.kind for row in logged} == {"transcription"}


def test_forged_or_replayed_transcription_callbacks_are_403_and_store_nothing(app, client, plivo):
    params = plivo.transcribe("rec-forged", GUARANTEED)
    headers = plivo.sign_request("POST", TRANSCRIPTION_URL, params, auth_token="wrong")
    forged = client.post("/plivo/transcription", data=params, headers=headers)
    assert forged.status_code == 403
    assert forged.json["error"] == "bad_signature"
    unsigned = client.post("/plivo/transcription", data=params)
    assert unsigned.status_code == 403
    # Signed for the recording callback's URL: not valid for this one.
    elsewhere = plivo.sign_request(
        "POST", TRANSCRIPTION_URL.replace("transcription", "recording"), params
    )
    assert client.post("/plivo/transcription", data=params, headers=elsewhere).status_code == 403
    assert rows(app, Transcript) == []
    assert rows(app, CallbackLog) == []

    assert post_transcription(client, plivo, params, nonce="12345").status_code == 200
    replay = post_transcription(client, plivo, {**params, "recording_id": "other"}, nonce="12345")
    assert replay.status_code == 403
    assert replay.json["error"] == "replayed_nonce"
    assert [t.recording_id for t in rows(app, Transcript)] == ["rec-forged"]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"recording_id": ""}, "invalid_recording_id"),
        ({"recording_id": "../etc/passwd"}, "invalid_recording_id"),
        ({"duration": "ten"}, "invalid_duration"),
        ({"duration": "1e999999"}, "invalid_duration"),
        ({"transcription_charge": "-1"}, "invalid_transcription_charge"),
        ({"transcription_rate": "NaN"}, "invalid_transcription_rate"),
        ({"call_uuid": "x" * 65}, "invalid_call_uuid"),
        ({"error": "bad\x01error"}, "invalid_error"),
        ({"transcription": "nul \x00 inside"}, "invalid_transcription"),
    ],
)
def test_malformed_transcription_fields_are_400_naming_the_field(app, client, plivo, change, code):
    params = {**plivo.transcribe("rec-bad", "words"), **change}
    answer = post_transcription(client, plivo, params)
    assert answer.status_code == 400, answer.json
    assert answer.json["error"] == code
    assert rows(app, Transcript) == []
    assert rows(app, CallbackLog) == []


def test_a_callback_with_neither_transcription_nor_error_is_400(app, client, plivo):
    params = plivo.transcribe("rec-empty", "words")
    del params["transcription"]
    answer = post_transcription(client, plivo, params)
    assert answer.status_code == 400
    assert answer.json["error"] == "invalid_transcription"


def test_a_camelcase_recording_id_is_taken_too(app, client, plivo):
    params = plivo.transcribe("rec-camel", "spoken words")
    params["RecordingID"] = params.pop("recording_id")
    assert post_transcription(client, plivo, params).status_code == 200
    assert [t.recording_id for t in rows(app, Transcript)] == ["rec-camel"]
    clash = {**params, "recording_id": "rec-other"}
    answer = post_transcription(client, plivo, clash)
    assert answer.status_code == 400
    assert answer.json["error"] == "invalid_recording_id"


def test_transcription_arrives_by_get_too(app, client, plivo):
    params = plivo.transcribe("rec-get", "spoken words")
    headers = plivo.sign_request("GET", TRANSCRIPTION_URL, params)
    answer = client.get("/plivo/transcription", query_string=params, headers=headers)
    assert answer.status_code == 200, answer.json
    assert [t.recording_id for t in rows(app, Transcript)] == ["rec-get"]


def test_plivos_error_is_stored_and_shown(app, client, plivo, compliance):
    record(client, plivo, "rec-long")
    error = "Recording duration too long for transcription"
    answer = transcribe(client, plivo, "rec-long", "", error=error)
    assert answer.status_code == 200
    shown = client.get("/api/recordings/rec-long", headers=compliance).json
    assert shown["status"] == "pending"  # the audio goes on to the archive regardless
    assert shown["transcript"]["status"] == "error"
    assert shown["transcript"]["error"] == error
    full = client.get("/api/recordings/rec-long/transcript", headers=compliance).json
    assert full["error"] == error
    assert full["status"] == "error"


def test_non_ascii_transcripts_round_trip_byte_exact_and_are_searchable(
    app, client, plivo, compliance
):
    for recording_id, text in (("rec-accents", ACCENTED), ("rec-cjk", CJK)):
        record(client, plivo, recording_id)
        assert transcribe(client, plivo, recording_id, text).status_code == 200
        full = client.get(f"/api/recordings/{recording_id}/transcript", headers=compliance)
        assert full.json["text"].encode("utf-8") == text.encode("utf-8")
        assert full.json["chars"] == len(text)
    assert found(client, compliance, "café") == ["rec-accents"]
    assert found(client, compliance, '"déjà vu"') == ["rec-accents"]
    assert found(client, compliance, "cafe") == []  # accents are kept, not folded
    assert found(client, compliance, "東京") == ["rec-cjk"]
    assert found(client, compliance, "東京 -確認") == []
    hit = client.get("/api/recordings", query_string={"q": "zürich"}, headers=compliance)
    assert marked(hit.json["recordings"][0]["snippet"]) == ["Zürich"]


def test_transcript_endpoint_is_404_without_one_and_audited(app, client, plivo, compliance, auth):
    record(client, plivo, "rec-none")
    missing = client.get("/api/recordings/rec-none/transcript", headers=compliance)
    assert missing.status_code == 404
    assert missing.json["error"] == "transcript_not_found"
    assert client.get("/api/recordings/rec-none", headers=compliance).json["transcript"] is None
    transcribe(client, plivo, "rec-none", GUARANTEED)
    assert client.get("/api/recordings/rec-none/transcript", headers=compliance).status_code == 200
    with transaction(services(app).sessions) as session:
        audited = session.scalar(
            select(func.count()).where(AuditRecording.recording_id == "rec-none")
        )
    assert audited == 3
    no_token = client.get("/api/recordings/rec-none/transcript")
    assert no_token.status_code == 401
    operator = client.get("/api/recordings/rec-none/transcript", headers=auth(Role.OPERATOR))
    assert operator.status_code == 403


# --- searching ---------------------------------------------------------------------------------


@pytest.fixture
def library(client: Any, plivo: Any) -> None:
    """Three recordings with transcripts in two conferences, one without a transcript."""
    plivo.add_conference("x")
    for recording_id, text, conference in (
        ("rec-guaranteed", GUARANTEED, "Sales"),
        ("rec-weather", WEATHER, "Ops"),
        ("rec-bonds", BONDS, "Sales"),
    ):
        record(client, plivo, recording_id, conference)
        assert transcribe(client, plivo, recording_id, text).status_code == 200
    record(client, plivo, "rec-silent", "Sales")


def test_q_finds_words_phrases_alternatives_and_exclusions(library, client, compliance):
    assert found(client, compliance, "guaranteed") == ["rec-bonds", "rec-guaranteed"]
    assert found(client, compliance, '"guaranteed return"') == ["rec-guaranteed"]
    assert found(client, compliance, "GUARANTEED Return") == ["rec-guaranteed"]
    assert found(client, compliance, '"return guaranteed"') == []
    assert found(client, compliance, "return") == ["rec-guaranteed", "rec-weather"]
    assert found(client, compliance, "weather OR bonds") == ["rec-bonds", "rec-weather"]
    assert found(client, compliance, '"guaranteed return" OR treasury') == [
        "rec-bonds",
        "rec-guaranteed",
    ]
    assert found(client, compliance, "guaranteed -treasury") == ["rec-guaranteed"]
    assert found(client, compliance, 'return -"flight is late"') == ["rec-guaranteed"]
    assert found(client, compliance, "returns") == []  # no stemming: exact words
    assert found(client, compliance, "nowhere") == []


def test_q_combines_with_other_filters_and_the_cursor(library, client, compliance):
    assert found(client, compliance, "guaranteed", conference="Sales") == [
        "rec-bonds",
        "rec-guaranteed",
    ]
    assert found(client, compliance, "return", conference="Sales") == ["rec-guaranteed"]
    assert found(client, compliance, "return", status="archived") == []
    seen: list[str] = []
    cursor = None
    for _ in range(3):
        query = {"q": "the OR guaranteed", "limit": "1"}
        if cursor:
            query["cursor"] = cursor
        page = client.get("/api/recordings", query_string=query, headers=compliance).json
        seen += [r["recording_id"] for r in page["recordings"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == ["rec-bonds", "rec-guaranteed", "rec-weather"]
    assert cursor is None


def test_hits_carry_a_snippet_with_the_words_marked(library, client, compliance):
    page = client.get(
        "/api/recordings", query_string={"q": '"guaranteed return"'}, headers=compliance
    ).json
    (hit,) = page["recordings"]
    assert marked(hit["snippet"]) == ["guaranteed", "return"]
    assert "promise" in hit["snippet"]
    plain = client.get("/api/recordings", headers=compliance).json["recordings"]
    assert all("snippet" not in r for r in plain)


def test_export_takes_q_and_carries_snippets(library, client, compliance):
    answer = client.get(
        "/api/recordings/export", query_string={"q": "treasury"}, headers=compliance
    )
    assert answer.status_code == 200
    lines = [json.loads(line) for line in answer.data.decode().splitlines()]
    assert [line["recording_id"] for line in lines] == ["rec-bonds"]
    assert marked(lines[0]["snippet"]) == ["treasury"]
    assert lines[0]["transcript_status"] == "received"
    as_csv = client.get(
        "/api/recordings/export",
        query_string={"q": "treasury", "format": "csv"},
        headers=compliance,
    )
    assert "«treasury»" in as_csv.data.decode()


@pytest.mark.parametrize(
    "q", ["-guaranteed", "OR", '"" -x', "!!! ???", " OR ".join(f"w{n}" for n in range(40))]
)
def test_a_q_with_nothing_to_find_is_400(library, client, compliance, q):
    answer = client.get("/api/recordings", query_string={"q": q}, headers=compliance)
    assert answer.status_code == 400
    assert answer.json["error"] == "invalid_q"


def test_query_syntax_is_translated_with_explicit_precedence():
    query = parse_query('a "b c" -d OR e -"f g" OR')
    assert fts5_expression(query) == '(("a" AND "b c") NOT "d") OR (("e") NOT "f g")'
    # Punctuation inside a word splits it the way both databases' tokenizers do.
    assert fts5_expression(parse_query("don't")) == '("don t")'


def test_snippets_of_long_transcripts_show_the_match_far_in(plivo, make_app):
    app = make_app(MAX_CALLBACK_BYTES=str(1024 * 1024))
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token_for(app, Role.COMPLIANCE)}"}
    filler = " ".join(f"filler{n}" for n in range(5000))
    text = f"Speaker 0: {filler}\nSpeaker 1: a guaranteed return, I said. {filler}"
    record(client, plivo, "rec-long-text")
    assert transcribe(client, plivo, "rec-long-text", text).status_code == 200
    for q, words in (('"guaranteed return"', ["guaranteed", "return"]), ("said OR nowt", ["said"])):
        page = client.get("/api/recordings", query_string={"q": q}, headers=headers).json
        (hit,) = page["recordings"]
        assert marked(hit["snippet"]) == words
        assert len(hit["snippet"]) < 400
