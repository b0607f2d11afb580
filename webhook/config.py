"""Every setting the service reads from the environment, in one place."""

from __future__ import annotations

import os
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
            member_poll_seconds=_int(env, "MEMBER_POLL_SECONDS", 60) or 0,
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed (tests and the CLI use it)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        if "database_url" in changes:
            values["database_url"] = normalise_database_url(values["database_url"])
        return Settings(**values)


def load(instance_path: str, env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from the process environment (or the mapping given)."""
    return Settings.from_env(os.environ if env is None else env, instance_path)
