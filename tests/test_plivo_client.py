"""PlivoClient against a fake Plivo over real HTTP: the requests it makes and the errors it maps."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

import webhook.plivo
from tests.fakeplivo import FakePlivo, basic_auth_header
from webhook.plivo import PlivoClient, PlivoError

CALLBACK_URL = "https://archive.example.com/plivo/recording"
# Short enough to keep the timeout tests fast, long enough for a loaded CI machine to answer.
FAST_TIMEOUT = (1.0, 0.5)


@pytest.fixture
def fake() -> Iterator[FakePlivo]:
    with FakePlivo() as fake:
        yield fake


@pytest.fixture
def plivo_client(fake: FakePlivo) -> Iterator[PlivoClient]:
    client = PlivoClient(fake.auth_id, fake.auth_token, base_url=fake.url)
    yield client
    client.http.close()


def account_path(fake: FakePlivo, rest: str) -> str:
    return f"/v1/Account/{fake.auth_id}/{rest}"


def closed_port() -> int:
    """A local port nothing listens on, so connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- the calls ------------------------------------------------------------------------------------


def test_start_recording_sends_format_callback_and_basic_auth(
    fake: FakePlivo, plivo_client: PlivoClient
) -> None:
    fake.add_conference("room-1")
    answer = plivo_client.start_recording("room-1", "wav", CALLBACK_URL)

    recording_id = answer["recording_id"]
    assert answer["message"] == "conference recording started"
    assert answer["url"] == fake.media_url(recording_id, "wav")
    assert fake.calls == [
        (
            "POST",
            account_path(fake, "Conference/room-1/Record/"),
            {"file_format": "wav", "callback_url": CALLBACK_URL, "callback_method": "POST"},
        )
    ]
    assert fake.call_headers[0]["Authorization"] == basic_auth_header(
        "MAFAKEAUTHID", "fake-auth-token"
    )
    recording = fake.recordings[recording_id]
    assert recording["conference_name"] == "room-1"
    assert recording["recording_format"] == "wav"
    assert recording["callback_url"] == CALLBACK_URL
    assert recording["callback_method"] == "POST"
    assert recording["state"] == "recording"


def test_start_recording_quotes_the_conference_name(
    fake: FakePlivo, plivo_client: PlivoClient
) -> None:
    name = "Sales Room/Zoë 会议?#%"
    fake.add_conference(name)
    answer = plivo_client.start_recording(name, "mp3", CALLBACK_URL)
    assert fake.recordings[answer["recording_id"]]["conference_name"] == name


def test_start_recording_rejected_by_plivo_is_a_400(
    fake: FakePlivo, plivo_client: PlivoClient
) -> None:
    fake.add_conference("room-1")
    with pytest.raises(PlivoError) as caught:
        plivo_client.start_recording("room-1", "ogg", CALLBACK_URL)
    assert (caught.value.status, caught.value.code) == (400, "plivo_rejected")
    assert "mp3 or wav" in caught.value.message


def test_stop_recording(fake: FakePlivo, plivo_client: PlivoClient) -> None:
    fake.add_conference("room-1")
    recording_id = plivo_client.start_recording("room-1", "mp3", CALLBACK_URL)["recording_id"]
    plivo_client.stop_recording("room-1")
    assert fake.calls[-1] == ("DELETE", account_path(fake, "Conference/room-1/Record/"), {})
    assert fake.recordings[recording_id]["state"] == "stopped"


def test_stop_recording_of_unknown_conference_is_a_404(plivo_client: PlivoClient) -> None:
    with pytest.raises(PlivoError) as caught:
        plivo_client.stop_recording("nobody-here")
    assert (caught.value.status, caught.value.code) == (404, "not_found")


def test_get_conference_lists_members(fake: FakePlivo, plivo_client: PlivoClient) -> None:
    members = fake.add_conference(
        "room-1",
        [
            {"member_id": "17", "from": "1456789903", "to": "1677889900", "caller_name": "John"},
            {"member_id": "18", "from": "sip:zoe@example.com", "direction": "outbound"},
        ],
    )
    conference = plivo_client.get_conference("room-1")
    assert conference["conference_name"] == "room-1"
    assert conference["conference_member_count"] == "2"
    assert conference["conference_run_time"].isdigit()
    assert conference["members"] == members
    assert conference["members"][0]["caller_name"] == "John"
    assert conference["members"][1]["direction"] == "outbound"
    assert fake.calls == [("GET", account_path(fake, "Conference/room-1/"), {})]


def test_get_conference_default_members(fake: FakePlivo, plivo_client: PlivoClient) -> None:
    fake.add_conference("room-1")
    members = plivo_client.get_conference("room-1")["members"]
    assert len(members) == 2
    expected_fields = {"member_id", "muted", "deaf", "from", "to", "caller_name", "direction"}
    for member in members:
        assert expected_fields | {"call_uuid", "join_time"} <= member.keys()


def test_get_conference_that_ended_is_a_404(fake: FakePlivo, plivo_client: PlivoClient) -> None:
    fake.add_conference("room-1")
    fake.end_conference("room-1")
    with pytest.raises(PlivoError) as caught:
        plivo_client.get_conference("room-1")
    assert (caught.value.status, caught.value.code) == (404, "not_found")


def test_get_recording(fake: FakePlivo, plivo_client: PlivoClient) -> None:
    fake.add_conference("room-1")
    recording_id = plivo_client.start_recording("room-1", "mp3", CALLBACK_URL)["recording_id"]
    callback = fake.finish_recording(recording_id, b"ID3 audio", duration_ms=345100)

    recording = plivo_client.get_recording(recording_id)
    assert recording["recording_id"] == recording_id
    assert recording["conference_name"] == "room-1"
    assert recording["recording_type"] == "conference"
    assert recording["recording_format"] == "mp3"
    assert recording["recording_url"] == callback["record_url"] == fake.media_url(recording_id)
    assert recording["recording_duration_ms"] == "345100.00000"
    assert recording["recording_start_ms"] == callback["recording_start_ms"]
    assert recording["recording_end_ms"] == callback["recording_end_ms"]
    assert float(recording["recording_end_ms"]) - float(recording["recording_start_ms"]) == 345100
    assert recording["add_time"].endswith("+00:00")
    assert fake.calls[-1] == ("GET", account_path(fake, f"Recording/{recording_id}/"), {})


def test_get_unknown_recording_is_a_404(plivo_client: PlivoClient) -> None:
    with pytest.raises(PlivoError) as caught:
        plivo_client.get_recording("0b7d1c0e-0000-4000-8000-000000000000")
    assert (caught.value.status, caught.value.code) == (404, "not_found")


@pytest.mark.parametrize(("count", "pages"), [(0, 1), (7, 1), (20, 1), (40, 2), (45, 3)])
def test_iter_recordings_follows_every_page(
    fake: FakePlivo, plivo_client: PlivoClient, count: int, pages: int
) -> None:
    expected = {
        fake.finish_recording(f"rec-{number:03}", b"x", conference_name="big")["recording_id"]
        for number in range(count)
    }
    fake.finish_recording("rec-elsewhere", b"x", conference_name="other")

    found = [
        recording["recording_id"]
        for recording in plivo_client.iter_recordings(conference_name="big")
    ]

    assert sorted(found) == sorted(expected)
    assert len(found) == len(set(found))
    assert fake.calls == [
        (
            "GET",
            account_path(fake, "Recording/"),
            {"conference_name": "big", "limit": "20", "offset": str(20 * page)},
        )
        for page in range(pages)
    ]


def test_iter_recordings_passes_time_filters(fake: FakePlivo, plivo_client: PlivoClient) -> None:
    fake.finish_recording("rec-1", b"x", conference_name="room-1")
    added = fake.recordings["rec-1"]["add_time"]
    assert [r["recording_id"] for r in plivo_client.iter_recordings(add_time__gte=added)] == [
        "rec-1"
    ]
    assert list(plivo_client.iter_recordings(add_time__gt=added)) == []


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_conference_is_a_404(fake: FakePlivo, plivo_client: PlivoClient) -> None:
    with pytest.raises(PlivoError) as caught:
        plivo_client.start_recording("nobody-here", "mp3", CALLBACK_URL)
    assert (caught.value.status, caught.value.code) == (404, "not_found")
    assert fake.recordings == {}


@pytest.mark.parametrize("call", ["start", "get"])
def test_wrong_token_is_a_502_plivo_auth(fake: FakePlivo, call: str) -> None:
    fake.add_conference("room-1")
    plivo_client = PlivoClient(fake.auth_id, "not-the-token", base_url=fake.url)
    try:
        with pytest.raises(PlivoError) as caught:
            if call == "start":
                plivo_client.start_recording("room-1", "mp3", CALLBACK_URL)
            else:
                plivo_client.get_conference("room-1")
    finally:
        plivo_client.http.close()
    assert (caught.value.status, caught.value.code) == (502, "plivo_auth")
    assert len(fake.calls) == 1  # a 401 is not retried
    assert fake.recordings == {}


def test_forbidden_is_a_502_plivo_auth(fake: FakePlivo, plivo_client: PlivoClient) -> None:
    fake.api_faults.append(403)
    with pytest.raises(PlivoError) as caught:
        plivo_client.get_recording("rec-1")
    assert (caught.value.status, caught.value.code) == (502, "plivo_auth")


@pytest.mark.parametrize("status", [500, 503])
def test_server_error_on_post_is_a_502_and_not_retried(
    fake: FakePlivo, plivo_client: PlivoClient, status: int
) -> None:
    fake.add_conference("room-1")
    fake.api_faults.append(status)
    with pytest.raises(PlivoError) as caught:
        plivo_client.start_recording("room-1", "mp3", CALLBACK_URL)
    assert (caught.value.status, caught.value.code) == (502, "plivo_error")
    assert str(status) in caught.value.message
    assert [method for method, _, _ in fake.calls] == ["POST"]
    assert fake.recordings == {}


def test_server_error_on_delete_is_not_retried(fake: FakePlivo, plivo_client: PlivoClient) -> None:
    fake.add_conference("room-1")
    fake.api_faults.append(500)
    with pytest.raises(PlivoError) as caught:
        plivo_client.stop_recording("room-1")
    assert (caught.value.status, caught.value.code) == (502, "plivo_error")
    assert len(fake.calls) == 1


def test_server_error_on_get_is_retried(fake: FakePlivo, plivo_client: PlivoClient) -> None:
    fake.add_conference("room-1")
    fake.api_faults.extend([500, 503])
    assert plivo_client.get_conference("room-1")["conference_name"] == "room-1"
    assert [method for method, _, _ in fake.calls] == ["GET", "GET", "GET"]


def test_server_errors_on_get_give_up_after_three_tries(
    fake: FakePlivo, plivo_client: PlivoClient
) -> None:
    fake.add_conference("room-1")
    fake.api_faults.extend([500, 502, 503, 504])
    with pytest.raises(PlivoError) as caught:
        plivo_client.get_conference("room-1")
    assert (caught.value.status, caught.value.code) == (502, "plivo_error")
    assert len(fake.calls) == 3
    assert fake.api_faults == [504]


def test_iter_recordings_retries_a_failed_page(fake: FakePlivo, plivo_client: PlivoClient) -> None:
    for number in range(25):
        fake.finish_recording(f"rec-{number:03}", b"x", conference_name="big")
    found: list[str] = []
    for recording in plivo_client.iter_recordings(conference_name="big"):
        if not found:
            fake.api_faults.append(500)  # the second page fails once
        found.append(recording["recording_id"])
    assert len(set(found)) == 25
    assert [query["offset"] for _, _, query in fake.calls] == ["0", "20", "20"]


@pytest.mark.parametrize("call", ["start", "get"])
def test_connection_refused_is_a_502_plivo_unreachable(call: str) -> None:
    plivo_client = PlivoClient(
        "MAFAKEAUTHID", "fake-auth-token", f"http://127.0.0.1:{closed_port()}"
    )
    try:
        with pytest.raises(PlivoError) as caught:
            if call == "start":
                plivo_client.start_recording("room-1", "mp3", CALLBACK_URL)
            else:
                plivo_client.get_conference("room-1")
    finally:
        plivo_client.http.close()
    assert (caught.value.status, caught.value.code) == (502, "plivo_unreachable")


def test_stalled_post_is_a_504_plivo_timeout_and_not_retried(
    fake: FakePlivo, plivo_client: PlivoClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook.plivo, "DEFAULT_TIMEOUT", FAST_TIMEOUT)
    fake.add_conference("room-1")
    fake.api_faults.append("stall")
    with pytest.raises(PlivoError) as caught:
        plivo_client.start_recording("room-1", "mp3", CALLBACK_URL)
    assert (caught.value.status, caught.value.code) == (504, "plivo_timeout")
    assert len(fake.calls) == 1


def test_stalled_gets_are_a_504_plivo_timeout(
    fake: FakePlivo, plivo_client: PlivoClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook.plivo, "DEFAULT_TIMEOUT", FAST_TIMEOUT)
    fake.add_conference("room-1")
    fake.api_faults.extend(["stall", "stall", "stall"])
    with pytest.raises(PlivoError) as caught:
        plivo_client.get_conference("room-1")
    assert (caught.value.status, caught.value.code) == (504, "plivo_timeout")
    assert len(fake.calls) == 3


def test_one_stalled_get_is_retried(
    fake: FakePlivo, plivo_client: PlivoClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook.plivo, "DEFAULT_TIMEOUT", FAST_TIMEOUT)
    fake.add_conference("room-1")
    fake.api_faults.append("stall")
    assert plivo_client.get_conference("room-1")["conference_name"] == "room-1"
    assert len(fake.calls) == 2
