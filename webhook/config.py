"""Every setting the service reads from the environment, in one place."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

PLIVO_MEDIA_HOSTS = ("media.plivo.com",)
DEFAULT_RECORDING_HOSTS = (*PLIVO_MEDIA_HOSTS, "s3.amazonaws.com")
OBJECT_LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
S3_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class ConfigError(ValueError):
    """A setting in the environment cannot be used."""


def archive_prefix(archive_url: str) -> str:
    """The key prefix an ARCHIVE_URL asks for (`s3://bucket/prefix` → `prefix/`)."""
    parts = urlsplit(archive_url)
    if parts.scheme != "s3":
        return ""
    prefix = unquote(parts.path).strip("/")
    return f"{prefix}/" if prefix else ""


def normalise_database_url(url: str) -> str:
    """Accept Heroku's `postgres://` and pick the psycopg 3 driver for PostgreSQL URLs."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _int(
    env: Mapping[str, str],
    name: str,
    default: int | None,
    minimum: int = 0,
    maximum: int | None = None,
) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value


def _hosts(raw: str) -> tuple[str, ...]:
    return tuple(h.strip().lower() for h in raw.split(",") if h.strip())


def _check_archive_url(url: str, on_dyno: bool) -> None:
    """Refuse an ARCHIVE_URL that would put recordings anywhere but where the operator meant."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"ARCHIVE_URL {url!r} names no bucket; write s3://BUCKET/PREFIX")
        if parts.query or parts.fragment:
            raise ConfigError("ARCHIVE_URL must be s3://BUCKET/PREFIX, without ? or #")
        if not S3_BUCKET_NAME.match(parts.netloc):
            raise ConfigError(
                f"ARCHIVE_URL names bucket {parts.netloc!r}, which is not an S3 bucket name "
                "(3 to 63 lowercase letters, digits, dots and hyphens)"
            )
        return
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):
            raise ConfigError(
                f"ARCHIVE_URL {url!r} is not an absolute folder; write file:///absolute/path"
            )
        if on_dyno:
            raise ConfigError(
                "ARCHIVE_URL is a local folder, which a platform dyno loses on restart; "
                "set it to s3://BUCKET/PREFIX"
            )
        return
    if not parts.scheme:
        raise ConfigError(
            f"ARCHIVE_URL {url!r} has no scheme; write s3://{url.strip('/')} for a bucket "
            f"or file:///absolute/path for a folder"
        )
    raise ConfigError(
        f"ARCHIVE_URL must be s3://BUCKET/PREFIX or file:///absolute/path, not {parts.scheme}:"
    )


def _check_database_url(url: str, on_dyno: bool) -> None:
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise ConfigError(
            "DATABASE_URL is not a database URL; write postgres://USER:PASSWORD@HOST/NAME"
        ) from None
    if backend not in ("postgresql", "sqlite"):
        raise ConfigError(
            f"DATABASE_URL must be a PostgreSQL (postgres://) or SQLite URL, not {backend}"
        )
    if backend == "sqlite" and on_dyno:
        raise ConfigError(
            "DATABASE_URL is SQLite, which a platform dyno loses on restart and does not share "
            "between web and worker; attach PostgreSQL (postgres://...)"
        )


def _http_url(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    """An absolute http(s) base URL with a host, without a trailing slash, query or fragment."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{name} must be an absolute URL such as https://archive.example.com, got {raw!r}"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"{name} must be a base URL without ? or #, got {raw!r}")
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ConfigError(f"{name} has a bad port: {raw!r}") from None
    return raw.rstrip("/")


def _check_hosts(hosts: tuple[str, ...]) -> None:
    for host in hosts:
        bare = host.removeprefix("*.")
        # One colon is host:port; an IPv6 address (::1) has several.
        if "/" in bare or "*" in bare or " " in bare or bare.count(":") == 1:
            raise ConfigError(
                f"RECORDING_HOSTS lists host names only (media.plivo.com, *.example.com), "
                f"not {host!r}"
            )


MIN_METRICS_TOKEN = 16


@dataclass(frozen=True)
class Settings:
    """The service's configuration; `from_env` is the only place that reads os.environ."""

    database_url: str
    archive_url: str
    plivo_auth_id: str | None
    plivo_auth_token: str | None
    plivo_main_auth_token: str | None
    plivo_api_url: str
    public_url: str | None
    recording_hosts: tuple[str, ...]
    recording_hosts_listed: bool
    retention_days: int | None
    object_lock_mode: str | None
    archive_lease_seconds: int
    archive_retry_base_seconds: int
    archive_max_attempts: int
    reconcile_interval_seconds: int
    max_callback_bytes: int
    presign_seconds: int
    console_idle_minutes: float
    trusted_proxy_hops: int
    media_max_bytes: int
    media_deadline_seconds: int
    media_read_timeout_seconds: int
    media_min_bytes_per_second: int
    request_read_seconds: int
    response_write_seconds: int
    database_timeout_seconds: int
    database_pool_size: int
    auto_record: tuple[str, ...] = ()
    auto_record_interval_seconds: int = 30
    recording_notice_text: str | None = None
    recording_notice_url: str | None = None
    recording_notice_voice: str = "WOMAN"
    recording_notice_language: str = "en-US"
    delete_from_plivo_after_days: float | None = None
    transcription: str = "off"
    member_poll_seconds: int = 60
    metrics_token: str | None = None
    archive_kms_key_id: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], instance_path: str) -> Settings:
        hosts_raw = env.get("RECORDING_HOSTS", "")
        lock_mode = env.get("OBJECT_LOCK_MODE", "").strip().upper() or None
        if lock_mode is not None and lock_mode not in OBJECT_LOCK_MODES:
            raise ConfigError(f"OBJECT_LOCK_MODE must be one of {', '.join(OBJECT_LOCK_MODES)}")
        retention = _int(env, "RETENTION_DAYS", None, minimum=1)
        if (retention is None) != (lock_mode is None):
            raise ConfigError("RETENTION_DAYS and OBJECT_LOCK_MODE are set together or not at all")
        on_dyno = bool(env.get("DYNO"))
        if on_dyno and not (env.get("DATABASE_URL") and env.get("ARCHIVE_URL")):
            # On Heroku the instance folder is per-dyno and wiped on restart: web and worker
            # would each keep their own database and archive, and lose both.
            raise ConfigError("DATABASE_URL and ARCHIVE_URL must be set on a platform dyno")
        default_db = "sqlite:///" + str(Path(instance_path) / "webhook.sqlite3")
        default_archive = "file://" + str(Path(instance_path) / "archive")
        database_url = normalise_database_url(env.get("DATABASE_URL", "").strip() or default_db)
        _check_database_url(database_url, on_dyno)
        archive_url = env.get("ARCHIVE_URL", "").strip() or default_archive
        _check_archive_url(archive_url, on_dyno)
        if lock_mode and not archive_url.startswith("s3:"):
            raise ConfigError("OBJECT_LOCK_MODE needs an S3 archive; set ARCHIVE_URL=s3://...")
        recording_hosts = _hosts(hosts_raw)
        _check_hosts(recording_hosts)
        auth_id = env.get("PLIVO_AUTH_ID", "").strip() or None
        auth_token = env.get("PLIVO_AUTH_TOKEN", "").strip() or None
        if auth_id and not auth_token:
            raise ConfigError("PLIVO_AUTH_ID is set without PLIVO_AUTH_TOKEN; set both")
        metrics_token = env.get("METRICS_TOKEN", "").strip() or None
        if metrics_token is not None and len(metrics_token) < MIN_METRICS_TOKEN:
            raise ConfigError(
                f"METRICS_TOKEN must be at least {MIN_METRICS_TOKEN} characters "
                "(for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        public_url = _http_url(env, "PUBLIC_URL", None)
        kms_key_id = env.get("ARCHIVE_KMS_KEY_ID", "").strip() or None
        if kms_key_id and not archive_url.startswith("s3:"):
            raise ConfigError("ARCHIVE_KMS_KEY_ID needs an S3 archive; set ARCHIVE_URL=s3://...")
        return cls(
            database_url=database_url,
            archive_url=archive_url,
            plivo_auth_id=auth_id,
            plivo_auth_token=auth_token,
            plivo_main_auth_token=env.get("PLIVO_MAIN_AUTH_TOKEN", "").strip() or None,
            plivo_api_url=_http_url(env, "PLIVO_API_URL", "https://api.plivo.com")
            or "https://api.plivo.com",
            public_url=public_url,
            recording_hosts=recording_hosts or DEFAULT_RECORDING_HOSTS,
            recording_hosts_listed=bool(recording_hosts),
            retention_days=retention,
            object_lock_mode=lock_mode,
            archive_lease_seconds=_int(env, "ARCHIVE_LEASE_SECONDS", 600, minimum=5) or 600,
            archive_retry_base_seconds=_int(env, "ARCHIVE_RETRY_BASE_SECONDS", 30) or 0,
            archive_max_attempts=_int(env, "ARCHIVE_MAX_ATTEMPTS", 8, minimum=1) or 8,
            reconcile_interval_seconds=_int(env, "RECONCILE_INTERVAL_SECONDS", 3600) or 0,
            max_callback_bytes=_int(env, "MAX_CALLBACK_BYTES", 64 * 1024, minimum=1024) or 65536,
            presign_seconds=_int(env, "PRESIGN_SECONDS", 60, minimum=1, maximum=300) or 60,
            console_idle_minutes=_console_idle_minutes(env),
            trusted_proxy_hops=_trusted_proxy_hops(env),
            media_max_bytes=_int(env, "MEDIA_MAX_BYTES", 2 * 1024**3, minimum=1024) or 0,
            media_deadline_seconds=_int(env, "MEDIA_DEADLINE_SECONDS", 3600, minimum=1) or 0,
            media_read_timeout_seconds=_int(env, "MEDIA_READ_TIMEOUT_SECONDS", 60, minimum=1) or 0,
            media_min_bytes_per_second=_int(env, "MEDIA_MIN_BYTES_PER_SECOND", 32768) or 0,
            request_read_seconds=_int(env, "REQUEST_READ_SECONDS", 10, minimum=1) or 10,
            response_write_seconds=_int(env, "RESPONSE_WRITE_SECONDS", 30, minimum=1) or 30,
            # libpq counts a connect timeout below 2 s as 2 s.
            database_timeout_seconds=_int(env, "DATABASE_TIMEOUT_SECONDS", 5, minimum=2) or 5,
            database_pool_size=_int(env, "DATABASE_POOL_SIZE", 20, minimum=1) or 20,
            **_policy(env, public_url),
            transcription=_transcription(env),
            member_poll_seconds=_int(env, "MEMBER_POLL_SECONDS", 60) or 0,
            metrics_token=metrics_token,
            archive_kms_key_id=kms_key_id,
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed (tests and the CLI use it)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        if "database_url" in changes:
            values["database_url"] = normalise_database_url(values["database_url"])
        return Settings(**values)


MAX_PROXY_HOPS = 5


def _trusted_proxy_hops(env: Mapping[str, str]) -> int:
    """How many proxies in front of the service append to X-Forwarded-For: the client address is
    the one the outermost trusted proxy saw. None off-platform; on a dyno, the platform router."""
    default = 1 if env.get("DYNO") else 0
    return _int(env, "TRUSTED_PROXY_HOPS", default, maximum=MAX_PROXY_HOPS) or 0


NOTICE_VOICES = ("WOMAN", "MAN")
LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
MAX_NOTICE_CHARACTERS = 3000


def _days(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of days, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a number of days, 0 or more, got {raw!r}")
    return value


def _policy(env: Mapping[str, str], public_url: str | None) -> dict[str, Any]:
    """The recording policy settings: auto-record, the recording notice, deletion from Plivo."""
    patterns = tuple(p.strip() for p in env.get("AUTO_RECORD", "").split(",") if p.strip())
    if patterns and not public_url:
        raise ConfigError(
            "AUTO_RECORD needs PUBLIC_URL, so Plivo can call back when a recording ends; "
            "set PUBLIC_URL=https://..."
        )
    text = env.get("RECORDING_NOTICE_TEXT", "").strip() or None
    url = env.get("RECORDING_NOTICE_URL", "").strip() or None
    if text and url:
        raise ConfigError("set RECORDING_NOTICE_TEXT or RECORDING_NOTICE_URL, not both")
    if text is not None and (len(text) > MAX_NOTICE_CHARACTERS or not text.isprintable()):
        raise ConfigError(
            f"RECORDING_NOTICE_TEXT must be at most {MAX_NOTICE_CHARACTERS} printable characters"
        )
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                "RECORDING_NOTICE_URL must be an absolute http(s) URL of an mp3 or wav file, "
                f"such as https://example.com/notice.mp3, got {url!r}"
            )
    voice = env.get("RECORDING_NOTICE_VOICE", "").strip().upper() or "WOMAN"
    if voice not in NOTICE_VOICES:
        raise ConfigError(
            f"RECORDING_NOTICE_VOICE must be one of {', '.join(NOTICE_VOICES)}, got {voice!r}"
        )
    language = env.get("RECORDING_NOTICE_LANGUAGE", "").strip() or "en-US"
    if not LANGUAGE.match(language):
        raise ConfigError(f"RECORDING_NOTICE_LANGUAGE must look like en-US, got {language!r}")
    return {
        "auto_record": patterns,
        "auto_record_interval_seconds": _int(env, "AUTO_RECORD_INTERVAL_SECONDS", 30, minimum=1)
        or 30,
        "recording_notice_text": text,
        "recording_notice_url": url,
        "recording_notice_voice": voice,
        "recording_notice_language": language,
        "delete_from_plivo_after_days": _days(env, "DELETE_FROM_PLIVO_AFTER_DAYS"),
    }


TRANSCRIPTION_MODES = ("off", "auto")


def _transcription(env: Mapping[str, str]) -> str:
    # Plivo charges for every transcript: only an explicit `auto` asks for them.
    mode = env.get("TRANSCRIPTION", "").strip().lower() or "off"
    if mode not in TRANSCRIPTION_MODES:
        raise ConfigError(f"TRANSCRIPTION must be off or auto, got {mode!r}")
    return mode


def load(instance_path: str, env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from the process environment (or the mapping given)."""
    return Settings.from_env(os.environ if env is None else env, instance_path)


def _console_idle_minutes(env: Mapping[str, str]) -> float:
    """CONSOLE_IDLE_MINUTES: 15 by default; decimals allowed (0.05 is three seconds)."""
    raw = env.get("CONSOLE_IDLE_MINUTES", "").strip()
    if not raw:
        return 15.0
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"CONSOLE_IDLE_MINUTES must be a number, got {raw!r}") from None
    if not 0 < value <= 24 * 60:
        raise ConfigError(f"CONSOLE_IDLE_MINUTES must be above 0 and at most 1440, got {raw}")
    return value
