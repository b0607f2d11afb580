"""The S3 archive: multipart uploads with per-part SHA-256, SSE, Object Lock and legal holds."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from webhook.archive.storage import (
    PART_SIZE,
    READ_SIZE,
    HashingReader,
    ObjectLockMissing,
    StorageError,
    StoredObject,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from s3transfer.manager import TransferManager


class S3Storage:
    """An S3 bucket (or any S3-compatible store via AWS_ENDPOINT_URL, which boto3 reads itself)."""

    def __init__(
        self, bucket: str, object_lock_mode: str | None = None, kms_key_id: str | None = None
    ) -> None:
        self.bucket = bucket
        self.object_lock_mode = object_lock_mode
        self.kms_key_id = kms_key_id
        self.description = f"s3://{bucket}"
        self.session = boto3.session.Session()
        self.client: S3Client = self.session.client(
            "s3",
            config=Config(
                # SigV4 presigned links carry their own short expiry (X-Amz-Expires).
                signature_version="s3v4",
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=5,
                read_timeout=60,
                # An upload's bytes are covered by the SHA-256 checksum header S3 checks them
                # against (the reader's own, below), itself signed: SigV4 need not hash the
                # body a second time.
                s3={"payload_signing_enabled": False},
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=4
        )
        # A stream is read ahead into memory part by part; s3transfer's default (10 parts) would
        # hold 80 MiB. Three bound the worker's memory whatever the recording's size.
        self.transfer.max_in_memory_upload_chunks = 3
        # The uploads in progress, by bucket and key: each part is sent with the SHA-256 the
        # reader computed over the bytes it read, for S3 to check the part against.
        self._streams: dict[tuple[str, str], HashingReader] = {}
        for operation in ("PutObject", "UploadPart"):
            self.client.meta.events.register(
                f"before-parameter-build.s3.{operation}", self._send_our_sha256
            )

    def _send_our_sha256(self, params: dict[str, Any], **_kwargs: Any) -> None:
        """Give S3 the part's SHA-256 as the reader computed it (botocore then computes none,
        and with payload signing off, hashes the body no more).

        S3 refuses a part whose bytes do not match it, so a part that is not the one the reader
        counted fails the upload (and is retried), never archived unchecked."""
        reader = self._streams.get((params.get("Bucket", ""), params.get("Key", "")))
        if reader is None or "ChecksumSHA256" in params:
            return
        checksum = reader.part_sha256(int(params.get("PartNumber", 1)))
        if checksum is not None:
            params["ChecksumSHA256"] = checksum

    @cached_property
    def _uploads(self) -> TransferManager:
        """One transfer manager (and its threads) for every upload of this process."""
        return create_transfer_manager(self.client, self.transfer)

    def put(
        self,
        key: str,
        reader: HashingReader,
        content_type: str,
        retain_until: dt.datetime | None,
        *,
        first_attempt: bool = False,
    ) -> StoredObject:
        extra: dict[str, Any] = {
            "ServerSideEncryption": "AES256",
            "ChecksumAlgorithm": "SHA256",
            "ContentType": content_type,
        }
        if self.kms_key_id:
            extra.update(ServerSideEncryption="aws:kms", SSEKMSKeyId=self.kms_key_id)
        if self.object_lock_mode and retain_until is not None:
            extra["ObjectLockMode"] = self.object_lock_mode
            extra["ObjectLockRetainUntilDate"] = retain_until
        try:
            if not first_attempt:
                self._abort_stale_uploads(key)
            stream = (self.bucket, key)
            if stream in self._streams:
                # One reader's digests per key: a second upload would send the first's.
                raise StorageError(f"an upload of {key} is already under way in this process")
            self._streams[stream] = reader
            try:
                # On failure the transfer manager aborts the multipart upload it started.
                self._uploads.upload(
                    cast("IO[bytes]", reader), self.bucket, key, extra_args=extra
                ).result()
            finally:
                del self._streams[stream]
            head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise StorageError(f"S3 upload of {key} failed: {exc}") from exc
        if head["ContentLength"] != reader.size:
            raise StorageError(
                f"S3 holds {head['ContentLength']} bytes for {key}, {reader.size} were sent"
            )
        if self.kms_key_id and head.get("ServerSideEncryption") != "aws:kms":
            raise StorageError(f"S3 did not encrypt {key} with ARCHIVE_KMS_KEY_ID")
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

    def check_kms_key(self, probe_key: str) -> None:
        """ARCHIVE_KMS_KEY_ID names an enabled key, and S3 encrypted `probe_key` with it."""
        assert self.kms_key_id is not None
        try:
            kms = self.session.client("kms", config=Config(connect_timeout=5, read_timeout=30))
            key = kms.describe_key(KeyId=self.kms_key_id)["KeyMetadata"]
            head = self.client.head_object(Bucket=self.bucket, Key=probe_key)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(
                f"ARCHIVE_KMS_KEY_ID {self.kms_key_id} is not usable: {exc}"
            ) from exc
        if not key.get("Enabled") or key.get("KeyState") != "Enabled":
            raise StorageError(
                f"ARCHIVE_KMS_KEY_ID {self.kms_key_id} is {key.get('KeyState', 'not enabled')}"
            )
        used = head.get("SSEKMSKeyId", "")
        if head.get("ServerSideEncryption") != "aws:kms" or used not in (
            key.get("Arn"),
            key.get("KeyId"),
            self.kms_key_id,
        ):
            raise StorageError(f"S3 encrypted the probe object with {used or 'another key'}")

    def remove_probe(self, key: str) -> None:
        """Delete every version of `webhook check`'s probe object (never a recording's key)."""
        try:
            listed = self.client.list_object_versions(Bucket=self.bucket, Prefix=key)
            for entry in [*listed.get("Versions", []), *listed.get("DeleteMarkers", [])]:
                if entry.get("Key") == key:
                    self.client.delete_object(
                        Bucket=self.bucket, Key=key, VersionId=entry["VersionId"]
                    )
        except ClientError:
            # A bucket that locks every object by default keeps the few bytes of the probe.
            return

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

    def retained_until(self, key: str, version_id: str | None) -> dt.datetime | None:
        """The Object Lock retain-until date S3 holds for the object, if any."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id:
            params["VersionId"] = version_id
        try:
            head = self.client.head_object(**params)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"S3 head of {key} failed: {exc}") from exc
        return head.get("ObjectLockRetainUntilDate")
