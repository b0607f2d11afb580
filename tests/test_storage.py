"""Archive storage: hashing while streaming, S3 (through moto's HTTP server) and a local folder."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.conftest import make_bucket
from webhook.archive.s3 import S3Storage
from webhook.archive.storage import (
    PART_SIZE,
    HashingReader,
    LocalStorage,
    StorageError,
    open_storage,
)
from webhook.config import archive_prefix

SMALL_PART = 1024
MiB = 1024 * 1024


class SourceBroke(OSError):
    """What a media connection dropping half-way looks like to the reader."""


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def drain(reader: HashingReader, size: int) -> bytes:
    chunks = []
    while chunk := reader.read(size):
        chunks.append(chunk)
    return b"".join(chunks)


def breaking_source(good_bytes: int, chunk: int = MiB) -> Callable[[int], bytes]:
    """A read callable that yields `good_bytes` random bytes, then fails like a dropped socket."""
    sent = 0

    def read(size: int) -> bytes:
        nonlocal sent
        if sent >= good_bytes:
            raise SourceBroke("connection reset by media host")
        take = min(size, chunk, good_bytes - sent)
        sent += take
        return os.urandom(take)

    return read


# --- HashingReader ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, SMALL_PART - 1, SMALL_PART, SMALL_PART + 1, 3 * SMALL_PART, 3 * SMALL_PART + 517],
)
@pytest.mark.parametrize("read_size", [1, 7, 1000, 4096, -1])
def test_hashing_reader_hashes_whole_stream_and_each_part(size: int, read_size: int) -> None:
    data = os.urandom(size)
    reader = HashingReader(io.BytesIO(data).read, part_size=SMALL_PART)

    assert drain(reader, read_size) == data
    assert reader.size == size
    assert reader.hexdigest() == hashlib.sha256(data).hexdigest()
    full_parts = [
        sha256(data[i : i + SMALL_PART]) for i in range(0, size - size % SMALL_PART, SMALL_PART)
    ]
    assert reader.part_digests == full_parts


@pytest.mark.parametrize(
    ("size", "parts"),
    [
        (0, 1),
        (1, 1),
        (SMALL_PART - 1, 1),
        (SMALL_PART, 1),
        (SMALL_PART + 1, 2),
        (3 * SMALL_PART, 3),
        (3 * SMALL_PART + 1, 4),
    ],
)
def test_s3_checksums_hold_whole_digest_and_composite_with_part_count(
    size: int, parts: int
) -> None:
    data = os.urandom(size)
    reader = HashingReader(io.BytesIO(data).read, part_size=SMALL_PART)
    drain(reader, 333)

    part_digests = [sha256(data[i : i + SMALL_PART]) for i in range(0, size, SMALL_PART)] or [
        sha256(b"")
    ]
    assert len(part_digests) == parts
    composite = b64(sha256(b"".join(part_digests)))
    checksums = reader.s3_checksums()
    assert b64(sha256(data)) in checksums
    assert f"{composite}-{parts}" in checksums
    # A wrong part count, or another object's digest, is not accepted.
    assert f"{composite}-{parts + 1}" not in checksums
    assert b64(sha256(data + b"x")) not in checksums


def test_hashing_reader_fills_each_read_from_a_source_that_gives_little_at_a_time() -> None:
    data = os.urandom(10_000)
    source = io.BytesIO(data)
    reader = HashingReader(lambda n: source.read(min(n, 100)), part_size=SMALL_PART)

    first = reader.read(2500)
    assert len(first) == 2500
    assert first + drain(reader, 3001) == data
    assert reader.hexdigest() == hashlib.sha256(data).hexdigest()


def test_hashing_reader_raises_interrupted_once_told_to_stop() -> None:
    from webhook.archive.storage import Interrupted

    stop = False
    reader = HashingReader(io.BytesIO(b"a" * 5000).read, interrupted=lambda: stop)
    assert reader.read(1000) == b"a" * 1000
    stop = True
    with pytest.raises(Interrupted):
        reader.read(1000)
    assert reader.size == 1000


# --- S3 on moto ---------------------------------------------------------------------------------


def s3_put(storage: S3Storage, key: str, data: bytes, retain_until: dt.datetime | None = None):
    return storage.put(key, HashingReader(io.BytesIO(data).read), "audio/mpeg", retain_until)


def test_s3_put_small_object_stores_exact_bytes_encrypted(s3, bucket: str) -> None:
    storage = S3Storage(bucket)
    data = os.urandom(200_000)

    stored = s3_put(storage, "recordings/2023/11/14/small.mp3", data)

    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    body = s3.get_object(Bucket=bucket, Key=stored.key)["Body"].read()
    assert body == data
    head = s3.head_object(Bucket=bucket, Key=stored.key, ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(data)
    assert head["ServerSideEncryption"] == "AES256"
    assert head["ContentType"] == "audio/mpeg"
    # A single PUT: S3 reports the SHA-256 of the whole object.
    assert head["ChecksumSHA256"] == b64(sha256(data))


@pytest.mark.parametrize(("size", "parts"), [(PART_SIZE, 1), (PART_SIZE + MiB + 123, 2)])
def test_s3_put_from_part_size_on_uses_multipart_and_checks_its_checksum(
    s3, bucket: str, size: int, parts: int
) -> None:
    storage = S3Storage(bucket)
    calls: list[str] = []
    storage.client.meta.events.register(
        "after-call.s3.*", lambda model, **_: calls.append(model.name)
    )
    data = os.urandom(size)
    reader = HashingReader(io.BytesIO(data).read)

    stored = storage.put("big.mp3", reader, "audio/mpeg", None)

    assert "CreateMultipartUpload" in calls
    assert calls.count("UploadPart") == parts
    assert "CompleteMultipartUpload" in calls
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert s3.get_object(Bucket=bucket, Key="big.mp3")["Body"].read() == data
    head = s3.head_object(Bucket=bucket, Key="big.mp3", ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(data)
    assert head["ServerSideEncryption"] == "AES256"
    # What S3 reports for a multipart upload is the composite checksum of the parts; our check
    # accepted it (put returned), and it is among the values we computed.
    assert head["ChecksumSHA256"] in reader.s3_checksums()
    part_digests = [sha256(data[i : i + PART_SIZE]) for i in range(0, size, PART_SIZE)]
    composite = b64(sha256(b"".join(part_digests)))
    assert head["ChecksumSHA256"].split("-")[0] == composite


@pytest.mark.parametrize("size", [300_000, 2 * PART_SIZE + 5])
def test_s3_gets_each_part_with_the_sha256_the_reader_computed_and_a_wrong_one_fails(
    bucket: str, size: int
) -> None:
    storage = S3Storage(bucket)
    sent: dict[int, str] = {}

    def note(request, event_name, **_):
        if event_name.endswith((".PutObject", ".UploadPart")):
            number = re.search(r"[?&]partNumber=(\d+)", request.url)
            sent[int(number.group(1)) if number else 1] = request.headers[
                "x-amz-checksum-sha256"
            ].decode()

    storage.client.meta.events.register("before-send.s3.*", note)
    data = os.urandom(size)

    storage.put("sent.mp3", HashingReader(io.BytesIO(data).read), "audio/mpeg", None)

    parts = [data[i : i + PART_SIZE] for i in range(0, size, PART_SIZE)]
    assert sent == {n: b64(sha256(part)) for n, part in enumerate(parts, start=1)}

    # The value sent is the reader's own count, not one botocore computes over what it sends:
    # a reader that counted other bytes for the last part sends that. (S3 refuses such a part
    # with BadDigest; moto does not check parts, so only a single PUT fails here, when the
    # confirmation finds S3's checksum is not the reader's.)
    class Miscounted(HashingReader):
        def part_sha256(self, number: int) -> str | None:
            return b64(sha256(b"not these bytes")) if number == len(parts) else None

    sent.clear()
    if len(parts) == 1:
        with pytest.raises(StorageError, match="SHA-256"):
            storage.put("miscounted.mp3", Miscounted(io.BytesIO(data).read), "audio/mpeg", None)
    else:
        storage.put("miscounted.mp3", Miscounted(io.BytesIO(data).read), "audio/mpeg", None)
    assert sent[len(parts)] == b64(sha256(b"not these bytes"))
    if len(parts) > 1:
        # A part the reader gives no value for is checksummed by botocore, as before.
        assert sent[1] == b64(sha256(parts[0]))


def test_s3_put_refuses_when_s3_reports_another_checksum(s3, bucket: str) -> None:
    storage = S3Storage(bucket)
    # Report a different object's checksum for whatever is asked (a corrupted store).
    wrong = b64(sha256(b"something else"))

    def tamper(parsed, **_):
        parsed["ChecksumSHA256"] = wrong

    storage.client.meta.events.register("after-call.s3.HeadObject", tamper)
    with pytest.raises(StorageError, match="SHA-256"):
        s3_put(storage, "tampered.mp3", b"audio bytes")


@pytest.mark.parametrize("good_bytes", [3 * MiB, PART_SIZE + 4 * MiB])
def test_s3_put_failing_mid_stream_leaves_no_object_and_no_upload(
    s3, bucket: str, good_bytes: int
) -> None:
    storage = S3Storage(bucket)
    calls: list[str] = []
    storage.client.meta.events.register(
        "after-call.s3.*", lambda model, **_: calls.append(model.name)
    )

    with pytest.raises(SourceBroke):
        storage.put("broken.mp3", HashingReader(breaking_source(good_bytes)), "audio/mpeg", None)

    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    if good_bytes > PART_SIZE:
        # The multipart upload had begun; it was aborted, not left to accrue storage.
        assert "CreateMultipartUpload" in calls
        assert "AbortMultipartUpload" in calls
    assert "CompleteMultipartUpload" not in calls
    assert "PutObject" not in calls


def test_s3_presigned_url_serves_the_bytes(bucket: str) -> None:
    storage = S3Storage(bucket)
    data = os.urandom(50_000)
    stored = s3_put(storage, "presigned.mp3", data)

    url = storage.presigned_url(stored.key, stored.version_id, 60)

    assert url is not None
    assert "Expires=" in url or "X-Amz-Expires=60" in url
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == data


def test_s3_read_streams_the_object_back(bucket: str) -> None:
    storage = S3Storage(bucket)
    data = os.urandom(3 * MiB + 5)
    s3_put(storage, "read.mp3", data)

    assert b"".join(storage.read("read.mp3")) == data
    with pytest.raises(StorageError):
        b"".join(storage.read("absent.mp3"))


def test_s3_check_passes_on_existing_bucket_and_fails_on_missing_one(bucket: str) -> None:
    S3Storage(bucket).check()
    with pytest.raises(StorageError, match="cannot be reached"):
        S3Storage(f"{bucket}-missing").check()


def test_s3_check_with_object_lock_mode_refuses_bucket_without_object_lock(bucket: str) -> None:
    with pytest.raises(StorageError, match="Object Lock"):
        S3Storage(bucket, "GOVERNANCE").check()


def test_s3_check_with_object_lock_mode_accepts_locked_bucket(s3_endpoint: str) -> None:
    locked = make_bucket(s3_endpoint, object_lock=True)
    S3Storage(locked, "GOVERNANCE").check()


def test_s3_put_with_retain_until_locks_the_object_version(s3, s3_endpoint: str) -> None:
    locked = make_bucket(s3_endpoint, object_lock=True)
    storage = S3Storage(locked, "COMPLIANCE")
    retain_until = (dt.datetime.now(dt.UTC) + dt.timedelta(days=7)).replace(microsecond=0)

    stored = s3_put(storage, "locked.mp3", b"retained audio", retain_until)

    assert stored.version_id
    head = s3.head_object(Bucket=locked, Key="locked.mp3", VersionId=stored.version_id)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert head["ObjectLockRetainUntilDate"] == retain_until
    # (GetObjectRetention is not asked: moto's server answers it with the object's body.)


def test_s3_put_without_retain_until_sets_no_lock(s3, s3_endpoint: str) -> None:
    locked = make_bucket(s3_endpoint, object_lock=True)
    storage = S3Storage(locked, "GOVERNANCE")

    s3_put(storage, "unlocked.mp3", b"audio", None)

    head = s3.head_object(Bucket=locked, Key="unlocked.mp3")
    assert "ObjectLockMode" not in head
    assert "ObjectLockRetainUntilDate" not in head


def test_s3_legal_hold_can_be_set_and_lifted(s3, s3_endpoint: str) -> None:
    locked = make_bucket(s3_endpoint, object_lock=True)
    storage = S3Storage(locked, "GOVERNANCE")
    stored = s3_put(storage, "held.mp3", b"evidence")

    storage.set_legal_hold(stored.key, stored.version_id, True)
    hold = s3.get_object_legal_hold(Bucket=locked, Key=stored.key, VersionId=stored.version_id)
    assert hold["LegalHold"]["Status"] == "ON"

    storage.set_legal_hold(stored.key, stored.version_id, False)
    hold = s3.get_object_legal_hold(Bucket=locked, Key=stored.key, VersionId=stored.version_id)
    assert hold["LegalHold"]["Status"] == "OFF"


def test_s3_legal_hold_on_missing_object_is_a_storage_error(s3_endpoint: str) -> None:
    locked = make_bucket(s3_endpoint, object_lock=True)
    with pytest.raises(StorageError, match="legal hold"):
        S3Storage(locked, "GOVERNANCE").set_legal_hold("absent.mp3", None, True)


# --- local folder -------------------------------------------------------------------------------


def test_local_put_and_read_round_trip(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "archive")
    data = os.urandom(2 * MiB + 3)

    stored = storage.put(
        "recordings/2023/11/14/r1.mp3", HashingReader(io.BytesIO(data).read), "audio/mpeg", None
    )

    path = tmp_path / "archive" / "recordings/2023/11/14/r1.mp3"
    assert path.read_bytes() == data
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.version_id is None
    assert b"".join(storage.read(stored.key)) == data
    assert storage.local_path(stored.key) == path.resolve()
    assert storage.presigned_url(stored.key, None, 60) is None


def test_local_put_failing_mid_stream_leaves_no_partial_file(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    storage = LocalStorage(root)

    with pytest.raises(SourceBroke):
        storage.put("a/b/r.mp3", HashingReader(breaking_source(3 * MiB)), "audio/mpeg", None)

    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_local_put_failing_keeps_the_previous_file_intact(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    old = os.urandom(1000)
    storage.put("r.mp3", HashingReader(io.BytesIO(old).read), "audio/mpeg", None)

    with pytest.raises(SourceBroke):
        storage.put("r.mp3", HashingReader(breaking_source(2 * MiB)), "audio/mpeg", None)

    assert (tmp_path / "r.mp3").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.mp3"]


@pytest.mark.parametrize("key", ["../x.mp3", "a/../../x.mp3", "/etc/x.mp3", "a/../../archive2/x"])
def test_local_refuses_keys_outside_the_root(tmp_path: Path, key: str) -> None:
    root = tmp_path / "archive"
    storage = LocalStorage(root)

    with pytest.raises(StorageError, match="outside"):
        storage.put(key, HashingReader(io.BytesIO(b"x").read), "audio/mpeg", None)
    with pytest.raises(StorageError, match="outside"):
        storage.local_path(key)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_local_read_of_missing_key_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot read"):
        b"".join(LocalStorage(tmp_path).read("absent.mp3"))


def test_local_check_creates_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "new" / "archive"
    LocalStorage(root).check()
    assert root.is_dir()


def test_local_check_fails_when_the_folder_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError, match="cannot be created"):
        LocalStorage(blocker / "archive").check()


def test_local_legal_hold_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="Object Lock"):
        LocalStorage(tmp_path).set_legal_hold("r.mp3", None, True)


# --- ARCHIVE_URL --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("archive_url", "prefix"),
    [
        ("s3://bucket/prefix", "prefix/"),
        ("s3://bucket/prefix/", "prefix/"),
        ("s3://bucket/a/b", "a/b/"),
        ("s3://bucket", ""),
        ("s3://bucket/", ""),
        ("s3://bucket/with%20space", "with space/"),
        ("file:///var/archive", ""),
        ("/var/archive", ""),
    ],
)
def test_archive_prefix_from_archive_url(archive_url: str, prefix: str) -> None:
    assert archive_prefix(archive_url) == prefix


def test_open_storage_s3_url_names_the_bucket(settings, s3_endpoint: str) -> None:
    storage = open_storage(settings.replace(archive_url="s3://my-bucket/some/prefix"))
    assert isinstance(storage, S3Storage)
    assert storage.bucket == "my-bucket"
    assert storage.object_lock_mode is None
    assert storage.description == "s3://my-bucket"


def test_open_storage_s3_passes_object_lock_mode(settings, s3_endpoint: str) -> None:
    storage = open_storage(
        settings.replace(archive_url="s3://locked", object_lock_mode="COMPLIANCE")
    )
    assert isinstance(storage, S3Storage)
    assert storage.object_lock_mode == "COMPLIANCE"


@pytest.mark.parametrize("archive_url", ["file://{root}", "{root}"])
def test_open_storage_local_folder(settings, tmp_path: Path, archive_url: str) -> None:
    root = tmp_path / "some folder"
    storage = open_storage(settings.replace(archive_url=archive_url.format(root=root)))
    assert isinstance(storage, LocalStorage)
    assert storage.root == root.resolve()


def test_open_storage_file_url_with_escaped_characters(settings, tmp_path: Path) -> None:
    storage = open_storage(settings.replace(archive_url=f"file://{tmp_path}/with%20space"))
    assert isinstance(storage, LocalStorage)
    assert storage.root == (tmp_path / "with space").resolve()


@pytest.mark.parametrize("archive_url", ["s3:///prefix-only", "ftp://host/x", "gs://bucket/x"])
def test_open_storage_refuses_bad_urls(settings, archive_url: str) -> None:
    with pytest.raises(StorageError, match="ARCHIVE_URL"):
        open_storage(settings.replace(archive_url=archive_url))
