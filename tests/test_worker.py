"""The archive worker: claiming, streaming into the archive, retries, leases, refusing bad URLs."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, update
from werkzeug.serving import make_server

from tests.conftest import MP3_TAG, AppFactory, make_settings, mp3_bytes, post_callback
from tests.fakeplivo import FakePlivo
from webhook import services
from webhook.archive.media import RefusedURL, check_url
from webhook.archive.reconcile import reconcile
from webhook.archive.worker import MAX_RETRY_DELAY, Worker, retry_delay
from webhook.config import Settings, archive_prefix
from webhook.db import transaction
from webhook.models import Recording, Status, utcnow
from webhook.recordings import archive_key, parse_report, record_report


def queue(app: Flask, plivo: FakePlivo, recording_id: str, content: bytes, **kw: Any) -> dict:
    """Finish a recording on the fake Plivo and deliver its signed callback; the params sent."""
    params = plivo.finish_recording(recording_id, content, **kw)
    response = post_callback(app.test_client(), plivo, params)
    assert response.status_code == 200, response.get_json()
    return params


def queue_url(app: Flask, recording_id: str, record_url: str) -> None:
    """Queue a recording whose callback named `record_url`, as the callback view would."""
    report = parse_report(
        {"recording_id": recording_id, "record_url": record_url, "recording_duration_ms": "1000"}
    )
    with transaction(services(app).sessions) as session:
        assert record_report(session, report)


def row(app: Flask, recording_id: str) -> Recording:
    with services(app).sessions() as session:
        return session.scalars(
            select(Recording).where(Recording.recording_id == recording_id)
        ).one()


def set_row(app: Flask, recording_id: str, **values: Any) -> None:
    with transaction(services(app).sessions) as session:
        session.execute(
            update(Recording).where(Recording.recording_id == recording_id).values(**values)
        )


def archive_files(app: Flask) -> list[Path]:
    root = Path(services(app).settings.archive_url.removeprefix("file://"))
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def media_paths(plivo: FakePlivo) -> list[str]:
    return [path for path, _auth in plivo.media_requests]


def expected_key(prefix: str, params: dict[str, str]) -> str:
    start = dt.datetime.fromtimestamp(float(params["recording_start_ms"]) / 1000, dt.UTC)
    return f"{prefix}recordings/{start:%Y/%m/%d}/{params['recording_id']}.mp3"


# --- archiving ----------------------------------------------------------------------------------


def test_queued_recording_is_archived_to_the_local_folder(app, plivo) -> None:
    audio = mp3_bytes(300_000)
    params = queue(app, plivo, "rec-local", audio)

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-local")
    assert recording.status == Status.ARCHIVED
    assert recording.archive_key == expected_key("", params)
    assert recording.archive_size == len(audio)
    assert recording.archive_sha256 == hashlib.sha256(audio).hexdigest()
    assert recording.attempts == 1
    assert recording.last_error is None
    assert recording.lease_token is None
    assert recording.archived_at is not None
    path = services(app).storage.local_path(recording.archive_key)
    assert path is not None
    assert path.read_bytes() == audio
    assert archive_files(app) == [path]

    # Nothing is due any more: a second run downloads and writes nothing.
    assert Worker(services(app)).run(once=True) == 0
    assert len(plivo.media_requests) == 1
    assert archive_files(app) == [path]


def test_queued_recording_is_archived_to_s3_under_the_prefix(make_app, plivo, s3, bucket) -> None:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    app = make_app(f"s3://{bucket}/prefix")
    audio = mp3_bytes(250_000)
    params = queue(app, plivo, "rec-s3", audio)

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-s3")
    key = expected_key("prefix/", params)
    assert recording.status == Status.ARCHIVED
    assert recording.archive_key == key
    assert recording.archive_size == len(audio)
    assert recording.archive_sha256 == hashlib.sha256(audio).hexdigest()
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == audio
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ServerSideEncryption"] == "AES256"
    assert head["ContentType"] == "audio/mpeg"
    assert recording.archive_version_id == head["VersionId"]

    assert Worker(services(app)).run(once=True) == 0
    objects = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in objects] == [key]
    versions = s3.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]
    assert len(versions) == 1


def test_the_worker_names_the_key_from_its_own_archive_url_not_the_web_process(
    make_app, plivo, s3, bucket
) -> None:
    web = make_app(f"s3://{bucket}/web-prefix")
    worker_app = make_app(f"s3://{bucket}/worker-prefix")
    audio = mp3_bytes(1000)
    params = queue(web, plivo, "rec-prefix", audio)
    assert row(web, "rec-prefix").archive_key is None

    assert Worker(services(worker_app)).run(once=True) == 1

    key = expected_key("worker-prefix/", params)
    assert row(web, "rec-prefix").archive_key == key
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == [key]


def test_a_row_queued_with_a_key_keeps_it(make_app, plivo, s3, bucket) -> None:
    app = make_app(f"s3://{bucket}/now")
    audio = MP3_TAG + b"old audio"
    queue(app, plivo, "rec-old", audio)
    set_row(app, "rec-old", archive_key="then/recordings/rec-old.mp3")

    assert Worker(services(app)).run(once=True) == 1

    assert row(app, "rec-old").archive_key == "then/recordings/rec-old.mp3"
    assert s3.get_object(Bucket=bucket, Key="then/recordings/rec-old.mp3")["Body"].read() == audio


def test_a_wav_recording_gets_a_wav_key(app, plivo) -> None:
    params = plivo.finish_recording("rec-wav", b"RIFF")
    params["record_url"] = plivo.media_url("rec-wav", "wav")
    assert post_callback(app.test_client(), plivo, params).status_code == 200
    assert Worker(services(app)).run(once=True) == 1
    assert str(row(app, "rec-wav").archive_key).endswith("/rec-wav.wav")


def test_recording_above_the_part_size_streams_into_s3_multipart(
    make_app, plivo, s3, bucket
) -> None:
    from webhook.archive.storage import PART_SIZE

    app = make_app(f"s3://{bucket}")
    audio = mp3_bytes(PART_SIZE + 1024 * 1024 + 7)
    queue(app, plivo, "rec-big", audio)

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-big")
    assert recording.status == Status.ARCHIVED, recording.last_error
    assert recording.archive_size == len(audio)
    assert recording.archive_sha256 == hashlib.sha256(audio).hexdigest()
    key = str(recording.archive_key)
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == audio
    # Uploaded in parts: S3's ETag for a multipart object ends in the number of parts.
    assert s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"').endswith("-2")
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_s3_archive_with_object_lock_sets_retention_from_the_end_time(
    make_app, plivo, s3, s3_endpoint
) -> None:
    from tests.conftest import make_bucket

    locked = make_bucket(s3_endpoint, object_lock=True)
    app = make_app(f"s3://{locked}", RETENTION_DAYS="2555", OBJECT_LOCK_MODE="COMPLIANCE")
    params = queue(app, plivo, "rec-locked", MP3_TAG + b"locked audio")

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-locked")
    end = dt.datetime.fromtimestamp(int(float(params["recording_end_ms"])) / 1000, dt.UTC)
    assert recording.retain_until is not None
    assert abs(recording.retain_until - (end + dt.timedelta(days=2555))) < dt.timedelta(seconds=1)
    head = s3.head_object(Bucket=locked, Key=recording.archive_key)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert abs(head["ObjectLockRetainUntilDate"] - recording.retain_until) < dt.timedelta(seconds=1)


def test_missing_durations_are_filled_from_plivo_recording_api(app, plivo) -> None:
    params = plivo.finish_recording(
        "rec-camel", MP3_TAG + b"camel audio", duration_ms=7250, scheme="camel"
    )
    for name in ("RecordingDuration", "RecordingDurationMs", "RecordingEndMs"):
        del params[name]
    assert post_callback(app.test_client(), plivo, params).status_code == 200
    before = row(app, "rec-camel")
    assert before.duration_ms is None
    assert before.end_ms is None

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-camel")
    assert recording.status == Status.ARCHIVED
    assert recording.duration_ms == 7250
    assert recording.duration_s == 7
    assert recording.end_ms == int(float(params["RecordingStartMs"])) + 7250
    assert any(
        method == "GET" and path.endswith("/Recording/rec-camel/")
        for method, path, _ in plivo.calls
    )


# --- media faults -------------------------------------------------------------------------------


def test_media_server_error_is_retried_then_archived(app, plivo) -> None:
    audio = mp3_bytes(5000)
    queue(app, plivo, "rec-500", audio)
    plivo.media_faults["rec-500"] = ["500"]

    assert Worker(services(app)).run(once=True) == 2

    recording = row(app, "rec-500")
    assert recording.status == Status.ARCHIVED
    assert recording.attempts == 2
    assert recording.last_error is None
    assert recording.archive_sha256 == hashlib.sha256(audio).hexdigest()
    assert len(plivo.media_requests) == 2


def test_media_404_on_every_attempt_ends_failed(app, plivo) -> None:
    queue(app, plivo, "rec-404", MP3_TAG + b"never served")
    plivo.media_faults["rec-404"] = ["404", "404", "404"]

    assert Worker(services(app)).run(once=True) == 3

    recording = row(app, "rec-404")
    assert recording.status == Status.FAILED
    assert recording.attempts == 3
    assert "404" in (recording.last_error or "")
    assert recording.next_attempt_at is None
    assert recording.archive_sha256 is None
    assert len(plivo.media_requests) == 3
    assert archive_files(app) == []
    # A failed recording is not picked up again.
    assert Worker(services(app)).run(once=True) == 0


def test_truncated_media_is_not_archived_and_is_retried(app, plivo) -> None:
    audio = mp3_bytes(1024 * 1024)
    params = queue(app, plivo, "rec-cut", audio)
    plivo.media_faults["rec-cut"] = ["truncate"]
    worker = Worker(services(app))

    job = worker.claim()
    assert job is not None
    worker.process(job)

    recording = row(app, "rec-cut")
    assert recording.status == Status.PENDING
    assert recording.attempts == 1
    assert recording.last_error
    assert recording.archive_sha256 is None
    # Nothing truncated is kept where the recording belongs.
    key_path = services(app).storage.local_path(expected_key("", params))
    assert key_path is not None
    assert "IncompleteRead" in recording.last_error or "promised" in recording.last_error
    assert not key_path.exists()
    assert archive_files(app) == []

    assert worker.run(once=True) == 1
    recording = row(app, "rec-cut")
    assert recording.status == Status.ARCHIVED
    assert recording.attempts == 2
    assert key_path.read_bytes() == audio


def test_stalled_media_times_out_and_is_retried(make_app, plivo) -> None:
    app = make_app(MEDIA_READ_TIMEOUT_SECONDS="1")
    plivo.stall_seconds = 2.5
    audio = mp3_bytes(2000)
    queue(app, plivo, "rec-stall", audio)
    plivo.media_faults["rec-stall"] = ["stall"]
    worker = Worker(services(app))

    job = worker.claim()
    assert job is not None
    worker.process(job)

    recording = row(app, "rec-stall")
    assert recording.status == Status.PENDING
    assert recording.attempts == 1
    assert "timed out" in (recording.last_error or "").lower()

    assert worker.run(once=True) == 1
    recording = row(app, "rec-stall")
    assert recording.status == Status.ARCHIVED
    assert recording.archive_sha256 == hashlib.sha256(audio).hexdigest()


def test_redirect_to_the_same_allowed_host_is_followed(app, plivo) -> None:
    audio = mp3_bytes(4000)
    queue(app, plivo, "rec-moved", audio)
    plivo.finish_recording("rec-real", audio)
    plivo.media_faults["rec-moved"] = [f"redirect:{plivo.media_url('rec-real')}"]

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-moved")
    assert recording.status == Status.ARCHIVED
    assert recording.attempts == 1
    assert recording.archive_sha256 == hashlib.sha256(audio).hexdigest()
    assert media_paths(plivo) == ["/media/rec-moved.mp3", "/media/rec-real.mp3"]


@pytest.mark.parametrize(
    "target",
    [
        "http://localhost:{port}/media/rec-evil.mp3",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "file:///etc/passwd",
    ],
)
def test_redirect_to_a_host_not_allowed_fails_permanently_without_a_request(
    app, plivo, target
) -> None:
    port = plivo.url.rsplit(":", 1)[1]
    queue(app, plivo, "rec-redir", MP3_TAG + b"audio")
    plivo.finish_recording("rec-evil", MP3_TAG + b"not to be fetched")
    plivo.media_faults["rec-redir"] = [f"redirect:{target.format(port=port)}"]

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-redir")
    assert recording.status == Status.FAILED
    assert recording.attempts == 1
    assert (recording.last_error or "").startswith("refused")
    # The only request was the first one: the redirect target was never asked.
    assert media_paths(plivo) == ["/media/rec-redir.mp3"]


def test_record_url_on_a_host_not_allowed_fails_refused_without_a_request(app, plivo) -> None:
    port = plivo.url.rsplit(":", 1)[1]
    plivo.finish_recording("rec-elsewhere", MP3_TAG + b"audio")
    # The fake answers on localhost too, but only 127.0.0.1 is in RECORDING_HOSTS.
    queue_url(app, "rec-elsewhere", f"http://localhost:{port}/media/rec-elsewhere.mp3")

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-elsewhere")
    assert recording.status == Status.FAILED
    assert (recording.last_error or "").startswith("refused")
    assert "localhost" in (recording.last_error or "")
    assert plivo.media_requests == []


@pytest.fixture
def gzipping_media_host() -> Iterator[tuple[str, list[str], dict[str, bool]]]:
    """A media host that compresses whenever the client says it accepts gzip (as CDNs do), or
    always when `options["always"]` is set (a misbehaving one)."""
    seen: list[str] = []
    options = {"always": False}

    def serve(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        accepted = environ.get("HTTP_ACCEPT_ENCODING", "")
        seen.append(accepted)
        body, headers = GZIPPED_AUDIO, [("Content-Type", "audio/mpeg")]
        if "gzip" in accepted or options["always"]:
            body = gzip.compress(GZIPPED_AUDIO)
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [body]

    server = make_server("127.0.0.1", 0, serve, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.port}/media/rec-gz.mp3", seen, options
    server.shutdown()
    thread.join()


GZIPPED_AUDIO = b"ID3" + bytes(range(256)) * 200


def test_media_is_archived_byte_exact_even_from_a_compressing_host(
    app, gzipping_media_host
) -> None:
    url, seen, _options = gzipping_media_host
    queue_url(app, "rec-gz", url)

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-gz")
    assert recording.status == Status.ARCHIVED, recording.last_error
    assert recording.archive_sha256 == hashlib.sha256(GZIPPED_AUDIO).hexdigest()
    assert recording.archive_size == len(GZIPPED_AUDIO)
    path = services(app).storage.local_path(str(recording.archive_key))
    assert path is not None and path.read_bytes() == GZIPPED_AUDIO
    assert len(seen) == 1


def test_media_compressed_against_our_wishes_is_not_archived(app, gzipping_media_host) -> None:
    url, _seen, options = gzipping_media_host
    options["always"] = True
    queue_url(app, "rec-gz", url)
    worker = Worker(services(app))

    job = worker.claim()
    assert job is not None
    worker.process(job)

    recording = row(app, "rec-gz")
    assert recording.status == Status.PENDING
    assert "Content-Encoding gzip" in (recording.last_error or "")
    assert recording.archive_sha256 is None
    assert archive_files(app) == []


def test_recording_without_record_url_fails_permanently(app) -> None:
    with transaction(services(app).sessions) as session:
        session.add(
            Recording(
                recording_id="rec-no-url",
                start_ms=1_700_000_000_000,
                status=Status.PENDING,
                attempts=0,
                next_attempt_at=utcnow(),
                archive_key="recordings/2023/11/14/rec-no-url.mp3",
                legal_hold=False,
            )
        )

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-no-url")
    assert recording.status == Status.FAILED
    assert "record_url" in (recording.last_error or "")


def test_media_host_never_gets_plivo_credentials_over_plain_http(app, plivo) -> None:
    queue(app, plivo, "rec-noauth", MP3_TAG + b"audio")

    Worker(services(app)).run(once=True)

    assert row(app, "rec-noauth").status == Status.ARCHIVED
    assert plivo.media_requests == [("/media/rec-noauth.mp3", False)]


# --- SSRF: which URLs the worker may fetch ------------------------------------------------------


@pytest.fixture
def resolve_to(monkeypatch) -> Callable[[str, str], None]:
    """`resolve_to(host, address)`: DNS answers `address` for `host` (a rebinding attacker)."""
    answers: dict[str, str] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port or 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers.__setitem__


@pytest.fixture
def default_hosts(database_url: str, tmp_path: Path, plivo: FakePlivo) -> Settings:
    """Settings as deployed without RECORDING_HOSTS: Plivo's own media hosts only."""
    return make_settings(database_url, f"file://{tmp_path}/archive", plivo, RECORDING_HOSTS="")


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example.test/x.mp3",
        "https://media.plivo.com.evil.test/x.mp3",
        "https://evilmedia.plivo.com/x.mp3",
        "http://localhost/x.mp3",
        "http://[::1]/x.mp3",
        "http://2130706433/x.mp3",
    ],
)
def test_check_url_refuses_hosts_not_listed(settings, url) -> None:
    with pytest.raises(RefusedURL, match="not in RECORDING_HOSTS"):
        check_url(url, settings)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/x.mp3",
        "gopher://127.0.0.1:70/_x",
        "dict://127.0.0.1:11211/",
        "127.0.0.1/x.mp3",
    ],
)
def test_check_url_refuses_other_schemes(settings, url) -> None:
    with pytest.raises(RefusedURL, match="scheme"):
        check_url(url, settings)


def test_check_url_refuses_a_url_without_host(settings) -> None:
    with pytest.raises(RefusedURL):
        check_url("http:///x.mp3", settings)


def test_check_url_allows_a_host_listed_explicitly(settings) -> None:
    check_url("http://127.0.0.1:8080/media/x.mp3", settings)


def test_default_hosts_refuse_loopback(default_hosts) -> None:
    assert default_hosts.recording_hosts_listed is False
    for url in ("http://127.0.0.1/x.mp3", "http://localhost/x.mp3", "http://10.0.0.1/x.mp3"):
        with pytest.raises(RefusedURL):
            check_url(url, default_hosts)


def test_default_host_resolving_to_a_private_address_is_refused(default_hosts, resolve_to) -> None:
    resolve_to("media.plivo.com", "127.0.0.1")
    with pytest.raises(RefusedURL, match=r"non-public address 127\.0\.0\.1"):
        check_url("https://media.plivo.com/v1/Account/X/Recording/r.mp3", default_hosts)
    resolve_to("media.plivo.com", "169.254.169.254")
    with pytest.raises(RefusedURL, match="non-public"):
        check_url("https://media.plivo.com/v1/Account/X/Recording/r.mp3", default_hosts)


def test_default_host_resolving_to_a_public_address_is_allowed(default_hosts, resolve_to) -> None:
    resolve_to("media.plivo.com", "52.1.2.3")
    check_url("https://media.plivo.com/v1/Account/X/Recording/r.mp3", default_hosts)


def test_loopback_name_is_allowed_only_when_that_host_is_listed(settings, resolve_to) -> None:
    resolve_to("media.internal.test", "127.0.0.1")
    url = "http://media.internal.test/r.mp3"
    listed = settings.replace(recording_hosts=("media.internal.test",))
    check_url(url, listed)
    # Matching a wildcard is not listing that very host: the private address is refused.
    wildcard = settings.replace(recording_hosts=("*.internal.test",))
    with pytest.raises(RefusedURL, match="non-public"):
        check_url(url, wildcard)
    with pytest.raises(RefusedURL, match="not in RECORDING_HOSTS"):
        check_url(url, settings)


# --- backoff ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempts", range(1, 10))
def test_retry_delay_is_jittered_within_half_and_all_of_the_exponential_ceiling(
    attempts: int,
) -> None:
    ceiling = 30 * 2 ** (attempts - 1)
    delays = [retry_delay(attempts, 30) for _ in range(300)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 1
    # The spread covers most of the window, not a single point of it.
    assert max(delays) - min(delays) > ceiling / 4


def test_retry_delay_doubles_with_each_attempt_and_is_capped() -> None:
    lows = [min(retry_delay(n, 30) for _ in range(50)) for n in range(1, 8)]
    assert all(later > earlier for earlier, later in itertools.pairwise(lows))
    assert retry_delay(1, 30) <= 30
    assert retry_delay(8, 30) >= 30 * 2**7 / 2
    assert all(retry_delay(40, 30) <= MAX_RETRY_DELAY for _ in range(50))


def test_failed_attempt_waits_before_the_next_one(make_app, plivo) -> None:
    app = make_app(ARCHIVE_RETRY_BASE_SECONDS="30")
    queue(app, plivo, "rec-wait", MP3_TAG + b"audio")
    plivo.media_faults["rec-wait"] = ["500"]
    before = utcnow()

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-wait")
    assert recording.status == Status.PENDING
    assert recording.attempts == 1
    assert "500" in (recording.last_error or "")
    assert recording.next_attempt_at is not None
    wait = recording.next_attempt_at - before
    assert dt.timedelta(seconds=15) <= wait <= dt.timedelta(seconds=31)
    assert len(plivo.media_requests) == 1
    # Due later, so another run does nothing now.
    assert Worker(services(app)).run(once=True) == 0
    assert len(plivo.media_requests) == 1


# --- leases -------------------------------------------------------------------------------------


def test_two_claims_take_two_different_jobs(app, plivo) -> None:
    queue(app, plivo, "rec-a", MP3_TAG + b"a")
    queue(app, plivo, "rec-b", MP3_TAG + b"b")
    worker = Worker(services(app))

    first, second = worker.claim(), worker.claim()

    assert first is not None and second is not None
    assert {first.recording_id, second.recording_id} == {"rec-a", "rec-b"}
    assert first.lease_token != second.lease_token
    assert worker.claim() is None
    assert row(app, "rec-a").status == Status.ARCHIVING
    assert row(app, "rec-a").attempts == 1


def test_an_outcome_rides_on_the_next_claim_only_while_the_lease_is_held(app, plivo) -> None:
    audio = {name: mp3_bytes(2000) + name.encode() for name in ("rec-1", "rec-2", "rec-3")}
    for name, content in audio.items():
        queue(app, plivo, name, content)
    worker = Worker(services(app))

    first = worker.claim()
    assert first is not None
    archived = worker.archive(first)
    assert archived is not None
    # Its lease ran out while it was archived, but nobody took it over: still ours to settle,
    # and not claimed again by the same claim.
    set_row(app, first.recording_id, next_attempt_at=utcnow() - dt.timedelta(seconds=1))
    second = worker.claim(archived)
    assert second is not None and second.recording_id != first.recording_id
    settled = row(app, first.recording_id)
    assert settled.status == Status.ARCHIVED
    assert settled.lease_token is None
    assert settled.archive_sha256 == hashlib.sha256(audio[first.recording_id]).hexdigest()
    assert settled.attempts == 1

    # Another worker holds the second job now: the late outcome is not written.
    archived = worker.archive(second)
    assert archived is not None
    set_row(app, second.recording_id, lease_token="another-worker-lease")
    third = worker.claim(archived)
    assert third is not None
    assert third.recording_id not in (first.recording_id, second.recording_id)
    stolen = row(app, second.recording_id)
    assert stolen.status == Status.ARCHIVING
    assert stolen.lease_token == "another-worker-lease"
    assert stolen.archived_at is None
    assert row(app, third.recording_id).archive_key == third.archive_key


def test_a_claim_names_each_new_key_exactly_as_archive_key_does(app) -> None:
    # On PostgreSQL the claiming statement names a new row's key itself: held here to the rule
    # at the edges of days, months, years and the range of start times, for each format.
    starts = {
        "k-last-ms-of-2025": (1_767_225_599_999, "mp3"),
        "k-first-ms-of-2026": (1_767_225_600_000, "wav"),
        "k-end-of-a-leap-day": (951_868_799_999, None),
        "k-first-ms-of-2000": (946_684_800_000, "mp3"),
        "k-last-ms-of-2099": (4_102_444_799_999, "wav"),
    }
    for recording_id, (start_ms, file_format) in starts.items():
        queue_url(app, recording_id, f"https://media.plivo.com/{recording_id}.mp3")
        set_row(app, recording_id, start_ms=start_ms, file_format=file_format)
    set_row(app, "k-first-ms-of-2000", archive_key="kept/from/before.mp3")
    worker = Worker(services(app))
    prefix = archive_prefix(services(app).settings.archive_url)

    claimed = {job.recording_id: job.archive_key for job in iter(worker.claim, None)}

    expected = {
        recording_id: archive_key(prefix, recording_id, start_ms, file_format or "mp3")
        for recording_id, (start_ms, file_format) in starts.items()
    }
    expected["k-first-ms-of-2000"] = "kept/from/before.mp3"  # a key on the row is kept
    assert claimed == expected
    assert {name: row(app, name).archive_key for name in starts} == expected
    assert expected["k-end-of-a-leap-day"].endswith("recordings/2000/02/29/k-end-of-a-leap-day.mp3")


def test_claimed_job_waits_for_its_lease_then_the_late_worker_is_ignored(app, plivo) -> None:
    audio = mp3_bytes(3000)
    queue(app, plivo, "rec-lease", audio)
    first, second = Worker(services(app)), Worker(services(app))

    slow = first.claim()
    assert slow is not None
    assert second.claim() is None

    # The first worker went quiet: its lease runs out.
    set_row(app, "rec-lease", next_attempt_at=utcnow() - dt.timedelta(seconds=1))
    taken = second.claim()
    assert taken is not None
    assert taken.id == slow.id
    assert taken.lease_token != slow.lease_token
    assert taken.attempts == 2

    # The first worker wakes up: whatever it concludes is not written.
    assert first._settle(slow, status=Status.FAILED, last_error="late") is False
    plivo.media_faults["rec-lease"] = ["404"]
    first.process(slow)
    recording = row(app, "rec-lease")
    assert recording.status == Status.ARCHIVING
    assert recording.lease_token == taken.lease_token
    assert recording.last_error is None

    second.process(taken)
    recording = row(app, "rec-lease")
    assert recording.status == Status.ARCHIVED
    assert recording.attempts == 2
    assert recording.archive_sha256 == hashlib.sha256(audio).hexdigest()

    # Even a late success cannot overwrite the outcome the lease holder wrote.
    first.process(slow)
    assert row(app, "rec-lease").archived_at == recording.archived_at


def test_long_download_keeps_extending_its_lease(make_app, plivo) -> None:
    app = make_app(ARCHIVE_LEASE_SECONDS="5")  # extended every 5/3 s while the job runs
    plivo.stall_seconds = 3.5
    queue(app, plivo, "rec-long", MP3_TAG + b"slow audio")
    plivo.media_faults["rec-long"] = ["stall"]
    worker = Worker(services(app))
    job = worker.claim()
    assert job is not None
    first_expiry = row(app, "rec-long").next_attempt_at
    assert first_expiry is not None

    runner = threading.Thread(target=worker.process, args=(job,))
    runner.start()
    deadline = time.monotonic() + 3.2
    while time.monotonic() < deadline and row(app, "rec-long").next_attempt_at == first_expiry:
        time.sleep(0.1)
    extended = row(app, "rec-long").next_attempt_at
    runner.join(timeout=10)

    assert extended is not None and extended > first_expiry
    recording = row(app, "rec-long")
    assert recording.status == Status.ARCHIVED
    assert recording.attempts == 1


def test_worker_that_lost_its_lease_mid_download_leaves_the_job_alone(make_app, plivo) -> None:
    app = make_app(ARCHIVE_LEASE_SECONDS="5")
    plivo.stall_seconds = 2.5
    queue(app, plivo, "rec-stolen", MP3_TAG + b"audio")
    plivo.media_faults["rec-stolen"] = ["stall"]
    worker = Worker(services(app))
    job = worker.claim()
    assert job is not None
    # Another worker took the job over (its lease had expired while this one was stuck).
    set_row(app, "rec-stolen", lease_token="another-worker-lease")

    worker.process(job)

    recording = row(app, "rec-stolen")
    assert recording.status == Status.ARCHIVING
    assert recording.lease_token == "another-worker-lease"
    assert recording.attempts == 1
    assert recording.last_error is None
    assert archive_files(app) == []


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_one_lease_keeper_thread_keeps_job_after_job_then_ends(make_app, plivo) -> None:
    app = make_app(ARCHIVE_LEASE_SECONDS="5")  # extended every 5/3 s
    for recording_id in ("rec-keep-1", "rec-keep-2"):
        queue(app, plivo, recording_id, MP3_TAG + b"audio")
    worker = Worker(services(app))

    def keepers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "lease-keeper"}

    earlier = keepers()  # other tests' keepers, ending on their own
    first = worker.claim()
    assert first is not None
    first_lease = worker.leases.keep(first)
    ours = keepers() - earlier
    assert len(ours) == 1
    # Another worker takes the first job over: its lease is lost, and only its.
    set_row(app, first.recording_id, lease_token="another-worker-lease")
    assert _wait_for(lambda: first_lease.lost, 4)
    worker.leases.release(first_lease)

    second = worker.claim()
    assert second is not None
    claimed_until = row(app, second.recording_id).next_attempt_at
    second_lease = worker.leases.keep(second)
    assert keepers() - earlier == ours  # the same thread keeps the next job's lease
    assert _wait_for(lambda: row(app, second.recording_id).next_attempt_at != claimed_until, 4)
    assert not second_lease.lost
    assert row(app, first.recording_id).lease_token == "another-worker-lease"
    worker.leases.release(second_lease)

    (thread,) = ours
    thread.join(timeout=4)  # idle for KEEPER_IDLE_SECONDS, it ends
    assert not thread.is_alive()
    third_lease = worker.leases.keep(second)  # and the next job starts another
    assert len(keepers() - earlier - ours) == 1
    worker.leases.release(third_lease)


def test_the_lease_keeper_goes_idle_on_release_not_when_the_lease_falls_due(app, plivo) -> None:
    queue(app, plivo, "rec-idle", MP3_TAG + b"audio")  # the default lease: extended every 200 s
    worker = Worker(services(app))
    earlier = {t for t in threading.enumerate() if t.name == "lease-keeper"}
    job = worker.claim()
    assert job is not None
    lease = worker.leases.keep(job)
    (thread,) = {t for t in threading.enumerate() if t.name == "lease-keeper"} - earlier
    worker.leases.release(lease)
    thread.join(timeout=3)  # KEEPER_IDLE_SECONDS after the release
    assert not thread.is_alive()


class StopAfter(threading.Event):
    """A stop event that gets set on its `calls`-th check (a SIGTERM arriving mid-stream)."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def is_set(self) -> bool:
        self.calls -= 1
        if self.calls <= 0:
            self.set()
        return super().is_set()


def test_worker_stopped_mid_stream_gives_the_job_back_uncounted(app, plivo) -> None:
    audio = mp3_bytes(4 * 1024 * 1024)
    queue(app, plivo, "rec-stop", audio)
    stop = StopAfter(calls=3)  # two 1 MiB reads go through, the third is refused
    worker = Worker(services(app), stop)

    job = worker.claim()
    assert job is not None
    worker.process(job)

    recording = row(app, "rec-stop")
    assert stop.is_set()
    assert recording.status == Status.PENDING
    assert recording.attempts == 0
    assert recording.lease_token is None
    assert recording.next_attempt_at is not None and recording.next_attempt_at <= utcnow()
    assert recording.archive_sha256 is None
    assert archive_files(app) == []

    assert Worker(services(app)).run(once=True) == 1
    recording = row(app, "rec-stop")
    assert recording.status == Status.ARCHIVED
    assert recording.attempts == 1


def test_job_claimed_again_after_its_last_attempt_died_is_failed(app, plivo) -> None:
    queue(app, plivo, "rec-dead", MP3_TAG + b"audio")
    set_row(app, "rec-dead", attempts=services(app).settings.archive_max_attempts)

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-dead")
    assert recording.status == Status.FAILED
    assert "stopped" in (recording.last_error or "")
    assert plivo.media_requests == []


# --- several workers ----------------------------------------------------------------------------


# On PostgreSQL the claims race through FOR UPDATE SKIP LOCKED; on SQLite the claiming UPDATE
# takes the database's single write lock, so the same promise holds there too.
def test_four_workers_archive_every_recording_exactly_once(app, plivo) -> None:
    audio = {f"rec-{n:02d}": mp3_bytes(1000 + n) for n in range(40)}
    for recording_id, content in audio.items():
        queue(app, plivo, recording_id, content)
    done: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            done.append(Worker(services(app)).run(once=True))
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert sum(done) == 40
    for recording_id, content in audio.items():
        recording = row(app, recording_id)
        assert recording.status == Status.ARCHIVED, recording.last_error
        assert recording.attempts == 1
        assert recording.archive_sha256 == hashlib.sha256(content).hexdigest()
    assert sorted(media_paths(plivo)) == sorted(f"/media/{r}.mp3" for r in audio)
    assert len(archive_files(app)) == 40


# --- periodic chores of a long-running worker -------------------------------------------------


def run_worker_until(app: Flask, done: Callable[[], bool], seconds: float = 20) -> None:
    """Run a long-running worker in a thread until `done()` or the time is up."""
    stop = threading.Event()
    thread = threading.Thread(target=Worker(services(app), stop).run, kwargs={"poll_seconds": 0.1})
    thread.start()
    try:
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_a_running_worker_archives_recordings_whose_callbacks_were_lost(
    make_app: AppFactory, plivo: FakePlivo
) -> None:
    app = make_app(RECONCILE_INTERVAL_SECONDS="3600")
    plivo.finish_recording("lost-1", MP3_TAG + b"never called back", conference_name="Room 9")
    queue(app, plivo, "called-1", MP3_TAG + b"called back")

    def both_archived() -> bool:
        with services(app).sessions() as session:
            states = session.scalars(select(Recording.status)).all()
        return sorted(states) == [Status.ARCHIVED, Status.ARCHIVED]

    run_worker_until(app, both_archived)
    lost = row(app, "lost-1")
    assert lost.status == Status.ARCHIVED and lost.attempts == 1
    assert lost.archive_sha256 == hashlib.sha256(MP3_TAG + b"never called back").hexdigest()
    assert lost.conference_name == "Room 9"
    assert row(app, "called-1").attempts == 1
    assert len(archive_files(app)) == 2


def test_reconcile_is_off_with_interval_zero_and_in_once_mode(
    make_app: AppFactory, plivo: FakePlivo
) -> None:
    plivo.finish_recording("lost-2", MP3_TAG + b"never called back")
    off = make_app(RECONCILE_INTERVAL_SECONDS="0")
    run_worker_until(off, lambda: False, seconds=1.5)
    on = make_app(RECONCILE_INTERVAL_SECONDS="3600")
    assert Worker(services(on)).run(once=True) == 0
    with services(on).sessions() as session:
        assert session.scalars(select(Recording)).all() == []


def test_of_several_workers_exactly_one_takes_each_turn_of_a_chore(make_app: AppFactory) -> None:
    app = make_app()
    workers = [Worker(services(app)) for _ in range(4)]
    assert [w._turn_is_ours("test-chore", 3600) for w in workers] == [True, False, False, False]
    assert not workers[0]._turn_is_ours("test-chore", 3600)
    assert workers[1]._turn_is_ours("other-chore", 3600)


# --- poison jobs --------------------------------------------------------------------------------


def test_an_unexpected_error_in_one_job_is_logged_and_retried_and_the_next_job_runs(
    app, plivo, monkeypatch, caplog
) -> None:
    queue(app, plivo, "rec-bug", mp3_bytes(1000))
    queue(app, plivo, "rec-fine", mp3_bytes(1000))
    storage = services(app).storage
    real_put = storage.put

    def put(key: str, *args: Any, **kwargs: Any) -> Any:
        if "rec-bug" in key:
            raise KeyError("a bug nobody foresaw")
        return real_put(key, *args, **kwargs)

    monkeypatch.setattr(storage, "put", put)
    worker = Worker(services(app))
    bug = worker.claim()
    assert bug is not None and bug.recording_id == "rec-bug"
    worker.process(bug)

    recording = row(app, "rec-bug")
    assert recording.status == Status.PENDING
    assert recording.attempts == 1
    assert recording.last_error == "unexpected error: KeyError: 'a bug nobody foresaw'"
    (logged,) = [r for r in caplog.records if r.getMessage() == "unexpected error in job"]
    assert logged.exc_info is not None and logged.exc_info[0] is KeyError

    assert worker.run(once=True) >= 1
    assert row(app, "rec-fine").status == Status.ARCHIVED


@pytest.mark.parametrize("duration", ["1e400", "1e30", "Infinity", "-5", "12 minutes"])
def test_a_bad_duration_from_plivo_recording_api_fails_the_job_naming_the_field(
    app, plivo, duration
) -> None:
    params = plivo.finish_recording("rec-api", mp3_bytes(1000), scheme="camel")
    for name in ("RecordingDuration", "RecordingDurationMs", "RecordingEndMs"):
        del params[name]
    assert post_callback(app.test_client(), plivo, params).status_code == 200
    plivo.recordings["rec-api"]["recording_duration_ms"] = duration

    assert Worker(services(app)).run(once=True) == 1

    recording = row(app, "rec-api")
    assert recording.status == Status.FAILED
    assert (recording.last_error or "").startswith("Plivo's Recording API: recording_duration_ms")
    assert recording.duration_ms is None
    assert media_paths(plivo) == []


def test_reconcile_skips_a_recording_whose_plivo_duration_is_absurd(app, plivo) -> None:
    plivo.finish_recording("rec-absurd", mp3_bytes(1000))
    plivo.finish_recording("rec-sane", mp3_bytes(1000))
    plivo.recordings["rec-absurd"]["recording_duration_ms"] = "1e400"
    warnings: list[str] = []

    result = reconcile(services(app), warn=warnings.append)

    assert (result.queued, result.skipped) == (1, 1)
    assert "recording_duration_ms" in warnings[0]
    assert row(app, "rec-sane").status == Status.PENDING


def test_with_archive_kms_key_id_every_object_is_sse_kms_under_that_key(
    make_app, plivo, s3, bucket, s3_endpoint
) -> None:
    import boto3

    kms = boto3.client("kms", endpoint_url=s3_endpoint)
    key = kms.create_key(Description="customer archive key")["KeyMetadata"]
    app = make_app(f"s3://{bucket}/kms", ARCHIVE_KMS_KEY_ID=key["KeyId"])
    for name in ("rec-kms-1", "rec-kms-2"):
        queue(app, plivo, name, mp3_bytes(5000))

    assert Worker(services(app)).run(once=True) == 2

    for name in ("rec-kms-1", "rec-kms-2"):
        head = s3.head_object(Bucket=bucket, Key=str(row(app, name).archive_key))
        assert head["ServerSideEncryption"] == "aws:kms"
        assert head["SSEKMSKeyId"] in (key["Arn"], key["KeyId"])
