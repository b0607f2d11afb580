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

PLIVO_MEDIA_HOSTS = ("media.plivo.com",)
DEFAULT_RECORDING_HOSTS = (*PLIVO_MEDIA_HOSTS, "s3.amazonaws.com")
OBJECT_LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")


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


def _int(env: Mapping[str, str], name: str, default: int | None, minimum: int = 0) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _hosts(raw: str) -> tuple[str, ...]:
    return tuple(h.strip().lower() for h in raw.split(",") if h.strip())


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
    auto_record: tuple[str, ...] = ()
    auto_record_interval_seconds: int = 30
    recording_notice_text: str | None = None
    recording_notice_url: str | None = None
    recording_notice_voice: str = "WOMAN"
    recording_notice_language: str = "en-US"
    delete_from_plivo_after_days: float | None = None
    transcription: str = "off"
    member_poll_seconds: int = 60

    @classmethod
    def from_env(cls, env: Mapping[str, str], instance_path: str) -> Settings:
        hosts_raw = env.get("RECORDING_HOSTS", "")
        lock_mode = env.get("OBJECT_LOCK_MODE", "").strip().upper() or None
        if lock_mode is not None and lock_mode not in OBJECT_LOCK_MODES:
            raise ConfigError(f"OBJECT_LOCK_MODE must be one of {', '.join(OBJECT_LOCK_MODES)}")
        retention = _int(env, "RETENTION_DAYS", None, minimum=1)
        if (retention is None) != (lock_mode is None):
            raise ConfigError("RETENTION_DAYS and OBJECT_LOCK_MODE are set together or not at all")
        if env.get("DYNO") and not (env.get("DATABASE_URL") and env.get("ARCHIVE_URL")):
            # On Heroku the instance folder is per-dyno and wiped on restart: web and worker
            # would each keep their own database and archive, and lose both.
            raise ConfigError("DATABASE_URL and ARCHIVE_URL must be set on a platform dyno")
        default_db = "sqlite:///" + str(Path(instance_path) / "webhook.sqlite3")
        default_archive = "file://" + str(Path(instance_path) / "archive")
        public_url = env.get("PUBLIC_URL", "").strip().rstrip("/") or None
        return cls(
            database_url=normalise_database_url(env.get("DATABASE_URL") or default_db),
            archive_url=env.get("ARCHIVE_URL") or default_archive,
            plivo_auth_id=env.get("PLIVO_AUTH_ID") or None,
            plivo_auth_token=env.get("PLIVO_AUTH_TOKEN") or None,
            plivo_main_auth_token=env.get("PLIVO_MAIN_AUTH_TOKEN") or None,
            plivo_api_url=(env.get("PLIVO_API_URL") or "https://api.plivo.com").rstrip("/"),
            public_url=public_url,
            recording_hosts=_hosts(hosts_raw) or DEFAULT_RECORDING_HOSTS,
            recording_hosts_listed=bool(_hosts(hosts_raw)),
            retention_days=retention,
            object_lock_mode=lock_mode,
            archive_lease_seconds=_int(env, "ARCHIVE_LEASE_SECONDS", 600, minimum=5) or 600,
            archive_retry_base_seconds=_int(env, "ARCHIVE_RETRY_BASE_SECONDS", 30) or 0,
            archive_max_attempts=_int(env, "ARCHIVE_MAX_ATTEMPTS", 8, minimum=1) or 8,
            reconcile_interval_seconds=_int(env, "RECONCILE_INTERVAL_SECONDS", 3600) or 0,
            max_callback_bytes=_int(env, "MAX_CALLBACK_BYTES", 64 * 1024, minimum=1024) or 65536,
            presign_seconds=min(_int(env, "PRESIGN_SECONDS", 60, minimum=1) or 60, 300),
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
            **_policy(env, public_url),
            transcription=_transcription(env),
            member_poll_seconds=_int(env, "MEMBER_POLL_SECONDS", 60) or 0,
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
    hops = _int(env, "TRUSTED_PROXY_HOPS", 1 if env.get("DYNO") else 0) or 0
    if hops > MAX_PROXY_HOPS:
        raise ConfigError(f"TRUSTED_PROXY_HOPS must be at most {MAX_PROXY_HOPS}, got {hops}")
    return hops


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
        raise ConfigError("AUTO_RECORD needs PUBLIC_URL, so Plivo can call back when it ends")
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
            raise ConfigError("RECORDING_NOTICE_URL must be an http(s) URL of an mp3 or wav file")
    voice = env.get("RECORDING_NOTICE_VOICE", "").strip().upper() or "WOMAN"
    if voice not in NOTICE_VOICES:
        raise ConfigError(f"RECORDING_NOTICE_VOICE must be one of {', '.join(NOTICE_VOICES)}")
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
