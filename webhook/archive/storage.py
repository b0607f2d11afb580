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
from typing import Protocol
from urllib.parse import unquote, urlsplit

from webhook.config import Settings

# Parts of a multipart upload. The hash of each part is kept so that S3's composite checksum
# (SHA-256 of the parts' SHA-256s) can be checked; 8 MiB parts allow objects up to 80 GiB
# (about 1 400 hours of 8 kHz 16-bit WAV).
PART_SIZE = 8 * 1024 * 1024
READ_SIZE = 1024 * 1024
STOP_CHECK_BYTES = 64 * 1024


class StorageError(Exception):
    """The archive failed or holds something other than what was written."""


class Unsupported(StorageError):
    """This kind of archive cannot do what was asked (nothing was changed)."""


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
        self.at_end = False

    def read(self, size: int = -1) -> bytes:
        wanted = READ_SIZE if size is None or size < 0 else size
        chunks: list[bytes] = []
        got = 0
        while got < wanted:
            # Checked per small chunk, not per (8 MiB) read: a slow host must not delay a stop.
            if self._interrupted():
                raise Interrupted("stopped while streaming")
            chunk = self._read(min(wanted - got, STOP_CHECK_BYTES))
            if not chunk:
                self.at_end = True
                break
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
        self._update(data)
        return data

    def _update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self._part_size - self._part_filled)
            piece = view[:take]
            self._whole.update(piece)
            if self.part_digests:
                # The first part's hash is the whole's at its end: its bytes are hashed once.
                self._part.update(piece)
            self._part_filled += take
            self.size += take
            view = view[take:]
            if self._part_filled == self._part_size:
                self._close_part()

    def _part_digest(self) -> bytes:
        return (self._part if self.part_digests else self._whole).digest()

    def _close_part(self) -> None:
        self.part_digests.append(self._part_digest())
        self._part = hashlib.sha256()
        self._part_filled = 0

    def hexdigest(self) -> str:
        return self._whole.hexdigest()

    def part_sha256(self, number: int) -> str | None:
        """Part `number`'s SHA-256 (base64, from 1) once all its bytes have been read, else None.

        Parts are counted as the uploader reads them, `part_size` bytes each: the last part is
        known only at the end of the stream."""
        if number <= len(self.part_digests):
            digest = self.part_digests[number - 1]
        elif self.at_end and number == len(self.part_digests) + 1:
            digest = self._part_digest()
        else:
            return None
        return base64.b64encode(digest).decode()

    def s3_checksums(self) -> set[str]:
        """The values S3 may report as ChecksumSHA256: the whole object's, or the composite one."""
        parts = list(self.part_digests)
        if self._part_filled or not parts:
            parts.append(self._part_digest())
        whole = base64.b64encode(self._whole.digest()).decode()
        composite = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
        return {whole, f"{composite}-{len(parts)}", composite}


class Storage(Protocol):
    """What the worker and the API need from an archive."""

    description: str

    def put(
        self,
        key: str,
        reader: HashingReader,
        content_type: str,
        retain_until: dt.datetime | None,
        *,
        first_attempt: bool = False,
    ) -> StoredObject:
        """Store the reader's bytes under `key` and confirm them. `first_attempt`: no earlier
        attempt can have left a partial upload of this key behind."""
        ...

    def read(self, key: str, version_id: str | None = None) -> Iterator[bytes]: ...

    def presigned_url(self, key: str, version_id: str | None, seconds: int) -> str | None: ...

    def local_path(self, key: str) -> Path | None: ...

    def check(self) -> None: ...

    def set_legal_hold(self, key: str, version_id: str | None, on: bool) -> None: ...

    def retained_until(self, key: str, version_id: str | None) -> dt.datetime | None: ...


def check_object(
    storage: Storage, key: str, version_id: str | None, size: int | None, sha256: str | None
) -> str | None:
    """Re-read an archived object: None when it holds exactly the bytes on file, else what differs.

    Raises StorageError when the object cannot be read (missing, or the archive is down).
    """
    digest = hashlib.sha256()
    seen = 0
    for chunk in storage.read(key, version_id):
        digest.update(chunk)
        seen += len(chunk)
    if seen == size and digest.hexdigest() == sha256:
        return None
    return f"expected {size} bytes sha256 {sha256}, found {seen} bytes sha256 {digest.hexdigest()}"


def open_storage(settings: Settings) -> Storage:
    """The storage named by ARCHIVE_URL (`s3://bucket/prefix` or `file:///path`)."""
    parts = urlsplit(settings.archive_url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StorageError("ARCHIVE_URL s3://… must name a bucket")
        # Imported here: boto3 takes a while to import and is needed only for an S3 archive.
        from webhook.archive.s3 import S3Storage

        return S3Storage(parts.netloc, settings.object_lock_mode, settings.archive_kms_key_id)
    if parts.scheme in ("file", ""):
        path = (
            unquote(parts.netloc + parts.path) if parts.scheme == "file" else settings.archive_url
        )
        return LocalStorage(Path(path))
    raise StorageError(
        f"ARCHIVE_URL must be s3://bucket/prefix or file:///path, not {parts.scheme}:"
    )


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
        self,
        key: str,
        reader: HashingReader,
        content_type: str,
        retain_until: dt.datetime | None,
        *,
        first_attempt: bool = False,
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
        raise Unsupported("legal holds need an S3 archive with Object Lock")

    def retained_until(self, key: str, version_id: str | None) -> dt.datetime | None:
        return None  # a folder cannot lock anything
