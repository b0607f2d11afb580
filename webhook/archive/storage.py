"""Where archived recordings are kept: an S3 bucket (production) or a local folder (a laptop)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import unquote, urlsplit

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from webhook.config import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# Parts of a multipart upload. The hash of each part is kept so that S3's composite checksum
# (SHA-256 of the parts' SHA-256s) can be checked; 16 MiB parts allow objects up to 160 GiB.
PART_SIZE = 16 * 1024 * 1024
READ_SIZE = 1024 * 1024


class StorageError(Exception):
    """The archive failed or holds something other than what was written."""


class ObjectLockMissing(StorageError):
    """Retention was asked for (OBJECT_LOCK_MODE) but the bucket cannot lock objects."""


class Interrupted(Exception):
    """The job was told to stop (shutdown, or its lease was lost) while streaming."""


@dataclass(frozen=True)
class StoredObject:
    """An object confirmed in the archive."""

    key: str
    size: int
    sha256: str
    version_id: str | None = None


class HashingReader:
    """A file-like view of a byte stream that hashes what passes through, whole and per part."""

    def __init__(
        self,
        read: Callable[[int], bytes],
        part_size: int = PART_SIZE,
        interrupted: Callable[[], bool] = lambda: False,
    ) -> None:
        self._read = read
        self._interrupted = interrupted
        self._part_size = part_size
        self._whole = hashlib.sha256()
        self._part = hashlib.sha256()
        self._part_filled = 0
        self.part_digests: list[bytes] = []
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        if self._interrupted():
            raise Interrupted("stopped while streaming")
        wanted = READ_SIZE if size is None or size < 0 else size
        chunks: list[bytes] = []
        got = 0
        while got < wanted:
            chunk = self._read(wanted - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
        self._update(data)
        return data

    def _update(self, data: bytes) -> None:
        self._whole.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self._part_size - self._part_filled)
            self._part.update(view[:take])
            self._part_filled += take
            view = view[take:]
            if self._part_filled == self._part_size:
                self._close_part()

    def _close_part(self) -> None:
        self.part_digests.append(self._part.digest())
        self._part = hashlib.sha256()
        self._part_filled = 0

    def hexdigest(self) -> str:
        return self._whole.hexdigest()

    def s3_checksums(self) -> set[str]:
        """The values S3 may report as ChecksumSHA256: the whole object's, or the composite one."""
        parts = list(self.part_digests)
        if self._part_filled or not parts:
            parts.append(self._part.digest())
        whole = base64.b64encode(self._whole.digest()).decode()
        composite = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
        return {whole, f"{composite}-{len(parts)}", composite}


class Storage(Protocol):
    """What the worker and the API need from an archive."""

    description: str

    def put(
        self, key: str, reader: HashingReader, content_type: str, retain_until: dt.datetime | None
    ) -> StoredObject: ...

    def read(self, key: str, version_id: str | None = None) -> Iterator[bytes]: ...

    def presigned_url(self, key: str, version_id: str | None, seconds: int) -> str | None: ...

    def local_path(self, key: str) -> Path | None: ...

    def check(self) -> None: ...

    def set_legal_hold(self, key: str, version_id: str | None, on: bool) -> None: ...


def archive_prefix(archive_url: str) -> str:
    """The key prefix an ARCHIVE_URL asks for (`s3://bucket/prefix` → `prefix/`)."""
    parts = urlsplit(archive_url)
    if parts.scheme != "s3":
        return ""
    prefix = unquote(parts.path).strip("/")
    return f"{prefix}/" if prefix else ""


def open_storage(settings: Settings) -> Storage:
    """The storage named by ARCHIVE_URL (`s3://bucket/prefix` or `file:///path`)."""
    parts = urlsplit(settings.archive_url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StorageError("ARCHIVE_URL s3://… must name a bucket")
        return S3Storage(parts.netloc, settings.object_lock_mode)
    if parts.scheme in ("file", ""):
        path = (
            unquote(parts.netloc + parts.path) if parts.scheme == "file" else settings.archive_url
        )
        return LocalStorage(Path(path))
    raise StorageError(
        f"ARCHIVE_URL must be s3://bucket/prefix or file:///path, not {parts.scheme}:"
    )


class S3Storage:
    """An S3 bucket (or any S3-compatible store via AWS_ENDPOINT_URL, which boto3 reads itself)."""

    def __init__(self, bucket: str, object_lock_mode: str | None = None) -> None:
        self.bucket = bucket
        self.object_lock_mode = object_lock_mode
        self.description = f"s3://{bucket}"
        self.client: S3Client = boto3.session.Session().client(
            "s3",
            config=Config(
                # SigV4 presigned links carry their own short expiry (X-Amz-Expires).
                signature_version="s3v4",
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=4
        )

    def put(
        self, key: str, reader: HashingReader, content_type: str, retain_until: dt.datetime | None
    ) -> StoredObject:
        extra: dict[str, Any] = {
            "ServerSideEncryption": "AES256",
            "ChecksumAlgorithm": "SHA256",
            "ContentType": content_type,
        }
        if self.object_lock_mode and retain_until is not None:
            extra["ObjectLockMode"] = self.object_lock_mode
            extra["ObjectLockRetainUntilDate"] = retain_until
        try:
            self._abort_stale_uploads(key)
            # On failure the transfer manager aborts the multipart upload it started.
            self.client.upload_fileobj(
                cast("IO[bytes]", reader), self.bucket, key, ExtraArgs=extra, Config=self.transfer
            )
            head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise StorageError(f"S3 upload of {key} failed: {exc}") from exc
        if head["ContentLength"] != reader.size:
            raise StorageError(
                f"S3 holds {head['ContentLength']} bytes for {key}, {reader.size} were sent"
            )
        reported = head.get("ChecksumSHA256")
        if reported is not None and reported not in reader.s3_checksums():
            raise StorageError(f"S3's SHA-256 for {key} does not match the bytes sent")
        return StoredObject(key, reader.size, reader.hexdigest(), head.get("VersionId"))

    def _abort_stale_uploads(self, key: str) -> None:
        """Abort multipart uploads of this key left open by a worker that was killed mid-upload.

        Only the worker holding a recording's lease writes its key, so any open upload of the
        key belongs to a previous, dead attempt.
        """
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=key):
            for upload in page.get("Uploads", []):
                if upload.get("Key") == key:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload["UploadId"]
                    )

    def read(self, key: str, version_id: str | None = None) -> Iterator[bytes]:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id:
            params["VersionId"] = version_id
        try:
            body = self.client.get_object(**params)["Body"]
            yield from body.iter_chunks(READ_SIZE)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"S3 read of {key} failed: {exc}") from exc

    def presigned_url(self, key: str, version_id: str | None, seconds: int) -> str | None:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id:
            params["VersionId"] = version_id
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=seconds)

    def local_path(self, key: str) -> Path | None:
        return None

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            if self.object_lock_mode:
                lock = self.client.get_object_lock_configuration(Bucket=self.bucket)
                enabled = lock.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
                if enabled != "Enabled":
                    raise ObjectLockMissing(
                        f"bucket {self.bucket} does not have Object Lock enabled"
                    )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ObjectLockConfigurationNotFoundError":
                raise ObjectLockMissing(
                    f"OBJECT_LOCK_MODE is set but bucket {self.bucket} has no Object Lock"
                ) from exc
            raise StorageError(f"bucket {self.bucket} cannot be reached: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"bucket {self.bucket} cannot be reached: {exc}") from exc

    def set_legal_hold(self, key: str, version_id: str | None, on: bool) -> None:
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "LegalHold": {"Status": "ON" if on else "OFF"},
        }
        if version_id:
            params["VersionId"] = version_id
        try:
            self.client.put_object_legal_hold(**params)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"legal hold on {key} failed: {exc}") from exc


class LocalStorage:
    """A folder on this machine: the embedded default, for a laptop without S3."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.description = f"file://{self.root}"

    def local_path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"key {key!r} points outside the archive folder")
        return path

    def put(
        self, key: str, reader: HashingReader, content_type: str, retain_until: dt.datetime | None
    ) -> StoredObject:
        path = self.local_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.partial-{uuid.uuid4().hex}")
        try:
            with partial.open("wb") as out:
                while chunk := reader.read(READ_SIZE):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        stored = hashlib.sha256()
        size = 0
        for chunk in self.read(key):
            stored.update(chunk)
            size += len(chunk)
        if size != reader.size or stored.hexdigest() != reader.hexdigest():
            raise StorageError(f"{path} does not hold the bytes that were written")
        return StoredObject(key, size, stored.hexdigest())

    def read(self, key: str, version_id: str | None = None) -> Iterator[bytes]:
        try:
            with self.local_path(key).open("rb") as file:
                while chunk := file.read(READ_SIZE):
                    yield chunk
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc}") from exc

    def presigned_url(self, key: str, version_id: str | None, seconds: int) -> str | None:
        return None

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"archive folder {self.root} cannot be created: {exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"archive folder {self.root} is not writable")

    def set_legal_hold(self, key: str, version_id: str | None, on: bool) -> None:
        raise StorageError("legal holds need an S3 archive with Object Lock")
