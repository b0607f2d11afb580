"""Readiness: what `webhook check` prints and `/healthz` answers, from the same checks."""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from webhook.archive.storage import HashingReader, ObjectLockMissing, StorageError
from webhook.config import Settings, archive_prefix
from webhook.db import (
    NOT_MIGRATED,
    UPGRADE_HINT,
    describe_error,
    head_revision,
    is_schema_missing,
    migrations_pending,
)
from webhook.errors import PlivoError

if TYPE_CHECKING:
    from webhook import Services

SECRET_SETTINGS = ("plivo_auth_token", "plivo_main_auth_token", "metrics_token")
DERIVED_SETTINGS = ("recording_hosts_listed",)  # follows from RECORDING_HOSTS, not a variable
PROBE_BYTES = b"webhook check\n"


@dataclass(frozen=True)
class Outcome:
    """One check: what was checked, whether it passed, and a sentence about it."""

    name: str
    ok: bool
    detail: str


def effective_settings(settings: Settings) -> Iterator[tuple[str, str]]:
    """Every setting as the service uses it, secrets masked (passwords, tokens)."""
    for field in fields(settings):
        if field.name in DERIVED_SETTINGS:
            continue
        value = getattr(settings, field.name)
        if field.name in SECRET_SETTINGS:
            shown = "(not set)" if value is None else "(set, hidden)"
        elif field.name == "database_url":
            shown = make_url(value).render_as_string(hide_password=True)
        elif isinstance(value, tuple):
            shown = ",".join(value)
        else:
            shown = "(not set)" if value is None else str(value)
        yield field.name.upper(), shown


@dataclass(frozen=True)
class Health:
    """One /healthz check: `problem` is None when it passes, else why not (a sentence for the log
    and for operators, never for anonymous callers: it may name a bucket or a host)."""

    problem: str | None
    # Whether the database answered at all (the caller's token can be looked up then).
    database_answers: bool = True


def database_health(svc: Services) -> Health:
    """The database answers and is migrated to the newest revision."""
    try:
        return Health(migrations_pending(svc.engine))
    except DBAPIError as exc:
        if is_schema_missing(exc):
            return Health(f"{NOT_MIGRATED}; {UPGRADE_HINT}")
        return Health(describe_error(exc), database_answers=False)


def archive_health(svc: Services) -> Health:
    """The archive answers (and locks objects, when OBJECT_LOCK_MODE asks for it)."""
    try:
        svc.storage.check()
    except StorageError as exc:
        return Health(str(exc))
    return Health(None)


def callbacks_health(settings: Settings) -> Health:
    """Callbacks can be verified: PLIVO_AUTH_TOKEN and PUBLIC_URL are both set."""
    missing = [
        name
        for name, value in (
            ("PLIVO_AUTH_TOKEN", settings.plivo_auth_token),
            ("PUBLIC_URL", settings.public_url),
        )
        if not value
    ]
    if not missing:
        return Health(None)
    return Health(f"{' and '.join(missing)} not set: every callback is refused")


def run_checks(svc: Services) -> Iterator[Outcome]:
    """Each dependency in turn, for `webhook check`: one outcome a line."""
    yield from _database(svc)
    yield from _archive(svc)
    yield _plivo(svc)
    yield _public_url(svc.settings)


def _database(svc: Services) -> Iterator[Outcome]:
    try:
        with svc.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError as exc:
        yield Outcome("database", False, f"cannot be reached: {_first_line(exc.orig)}")
        return
    yield Outcome("database", True, "reachable")
    try:
        pending = migrations_pending(svc.engine)
    except DBAPIError as exc:
        yield Outcome("migrations", False, _first_line(exc.orig))
        return
    if pending:
        yield Outcome("migrations", False, pending)
    else:
        yield Outcome("migrations", True, f"at the newest revision ({head_revision()})")


def _archive(svc: Services) -> Iterator[Outcome]:
    settings = svc.settings
    try:
        storage = svc.storage
        storage.check()
    except ObjectLockMissing as exc:
        yield Outcome("archive", True, "reachable")
        yield Outcome("object lock", False, str(exc))
        return
    except StorageError as exc:
        yield Outcome("archive", False, str(exc))
        return
    key = f"{archive_prefix(settings.archive_url)}.webhook-check/{uuid.uuid4().hex}"
    try:
        reader = HashingReader(io.BytesIO(PROBE_BYTES).read)
        written = storage.put(key, reader, "text/plain", None)
        read_back = b"".join(storage.read(key, written.version_id))
    except (StorageError, OSError) as exc:
        _remove_probe(svc, key)
        yield Outcome("archive", False, f"{storage.description} is not writable: {exc}")
        return
    try:
        if read_back != PROBE_BYTES:
            yield Outcome("archive", False, f"{storage.description} gave back other bytes")
            return
        yield Outcome("archive", True, f"{storage.description} is writable and readable")
        if settings.object_lock_mode:
            mode = settings.object_lock_mode
            yield Outcome("object lock", True, f"the bucket locks objects ({mode})")
        if settings.archive_kms_key_id:
            yield _kms(svc, key)
    finally:
        _remove_probe(svc, key)


def _kms(svc: Services, probe_key: str) -> Outcome:
    from webhook.archive.s3 import S3Storage

    storage = svc.storage
    assert isinstance(storage, S3Storage)  # config refuses ARCHIVE_KMS_KEY_ID without S3
    try:
        storage.check_kms_key(probe_key)
    except StorageError as exc:
        return Outcome("kms key", False, str(exc))
    return Outcome(
        "kms key",
        True,
        f"{svc.settings.archive_kms_key_id} is enabled and encrypted the probe object",
    )


def _plivo(svc: Services) -> Outcome:
    settings = svc.settings
    if not (settings.plivo_auth_id and settings.plivo_auth_token):
        return Outcome(
            "plivo",
            False,
            "PLIVO_AUTH_ID and PLIVO_AUTH_TOKEN are not set: callbacks are refused",
        )
    try:
        svc.plivo.check_credentials()
    except PlivoError as exc:
        return Outcome("plivo", False, f"{settings.plivo_api_url}: {exc.message}")
    return Outcome("plivo", True, f"{settings.plivo_api_url} accepts PLIVO_AUTH_ID's credentials")


def _public_url(settings: Settings) -> Outcome:
    if not settings.public_url:
        return Outcome(
            "public url",
            False,
            "PUBLIC_URL is not set: callbacks are refused and recordings cannot be started",
        )
    return Outcome(
        "public url",
        True,
        f"callbacks are signed over {settings.public_url}/plivo/recording "
        "(`webhook send-test-callback` tries it)",
    )


def _remove_probe(svc: Services, key: str) -> None:
    """Delete the probe object (every version of it); a bucket that locks by default keeps it."""
    storage = svc.storage
    path = storage.local_path(key)
    if path is not None:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # left in place if anything else is in it
            path.parent.rmdir()
        return
    from webhook.archive.s3 import S3Storage

    if isinstance(storage, S3Storage):
        storage.remove_probe(key)


def _first_line(error: object) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
