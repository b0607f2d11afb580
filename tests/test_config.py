"""Settings come from the environment, in one place, and bad values are refused at start."""

from __future__ import annotations

import pytest

from webhook.config import DEFAULT_RECORDING_HOSTS, ConfigError, load

INSTANCE = "/srv/instance"


def test_embedded_defaults_need_no_configuration() -> None:
    settings = load(INSTANCE, {})
    assert settings.database_url == "sqlite:////srv/instance/webhook.sqlite3"
    assert settings.archive_url == "file:///srv/instance/archive"
    assert settings.plivo_api_url == "https://api.plivo.com"
    assert settings.recording_hosts == DEFAULT_RECORDING_HOSTS
    assert settings.recording_hosts_listed is False
    assert (settings.archive_lease_seconds, settings.archive_retry_base_seconds) == (600, 30)
    assert settings.archive_max_attempts == 8
    assert settings.plivo_auth_token is None and settings.public_url is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db.example.com:5432/d", "postgresql+psycopg://u:p@db.example.com:5432/d"),
        ("postgresql://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_herokus_postgres_url_is_accepted(given: str, expected: str) -> None:
    assert load(INSTANCE, {"DATABASE_URL": given}).database_url == expected


def test_values_are_normalised() -> None:
    settings = load(
        INSTANCE,
        {
            "PUBLIC_URL": "https://archive.example.com/",
            "PLIVO_API_URL": "http://127.0.0.1:9000/",
            "RECORDING_HOSTS": " Media.Plivo.com , 127.0.0.1,,",
            "OBJECT_LOCK_MODE": "compliance",
            "RETENTION_DAYS": "2557",
        },
    )
    assert settings.public_url == "https://archive.example.com"
    assert settings.plivo_api_url == "http://127.0.0.1:9000"
    assert settings.recording_hosts == ("media.plivo.com", "127.0.0.1")
    assert settings.recording_hosts_listed is True
    assert (settings.object_lock_mode, settings.retention_days) == ("COMPLIANCE", 2557)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ARCHIVE_LEASE_SECONDS": "ten"}, "ARCHIVE_LEASE_SECONDS"),
        ({"ARCHIVE_LEASE_SECONDS": "1"}, "ARCHIVE_LEASE_SECONDS"),
        ({"ARCHIVE_MAX_ATTEMPTS": "0"}, "ARCHIVE_MAX_ATTEMPTS"),
        ({"ARCHIVE_RETRY_BASE_SECONDS": "-5"}, "ARCHIVE_RETRY_BASE_SECONDS"),
        ({"OBJECT_LOCK_MODE": "FOREVER", "RETENTION_DAYS": "1"}, "OBJECT_LOCK_MODE"),
        ({"RETENTION_DAYS": "30"}, "RETENTION_DAYS and OBJECT_LOCK_MODE"),
        ({"OBJECT_LOCK_MODE": "GOVERNANCE"}, "RETENTION_DAYS and OBJECT_LOCK_MODE"),
        ({"DYNO": "web.1"}, "DATABASE_URL and ARCHIVE_URL"),
        ({"DYNO": "worker.1", "DATABASE_URL": "postgres://h/d"}, "DATABASE_URL and ARCHIVE_URL"),
    ],
)
def test_unusable_settings_are_refused_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(INSTANCE, env)


def test_a_dyno_with_database_and_archive_starts() -> None:
    settings = load(
        INSTANCE, {"DYNO": "web.1", "DATABASE_URL": "postgres://h/d", "ARCHIVE_URL": "s3://b/p"}
    )
    assert settings.archive_url == "s3://b/p"


def test_presigned_links_never_outlive_five_minutes() -> None:
    assert load(INSTANCE, {"PRESIGN_SECONDS": "3600"}).presign_seconds == 300
    assert load(INSTANCE, {"PRESIGN_SECONDS": "60"}).presign_seconds == 60


def test_media_download_bounds_have_defaults_and_are_validated() -> None:
    settings = load(INSTANCE, {})
    assert settings.media_max_bytes == 2 * 1024**3
    assert (settings.media_deadline_seconds, settings.media_read_timeout_seconds) == (3600, 60)
    assert settings.media_min_bytes_per_second == 32768
    assert load(INSTANCE, {"MEDIA_MIN_BYTES_PER_SECOND": "0"}).media_min_bytes_per_second == 0
    for name, bad in (
        ("MEDIA_MAX_BYTES", "100"),
        ("MEDIA_MAX_BYTES", "2GB"),
        ("MEDIA_DEADLINE_SECONDS", "0"),
        ("MEDIA_READ_TIMEOUT_SECONDS", "0"),
        ("MEDIA_MIN_BYTES_PER_SECOND", "-1"),
    ):
        with pytest.raises(ConfigError, match=name):
            load(INSTANCE, {name: bad})


def test_member_poll_seconds_defaults_to_a_minute_and_zero_turns_it_off() -> None:
    assert load(INSTANCE, {}).member_poll_seconds == 60
    assert load(INSTANCE, {"MEMBER_POLL_SECONDS": "5"}).member_poll_seconds == 5
    assert load(INSTANCE, {"MEMBER_POLL_SECONDS": "0"}).member_poll_seconds == 0
    for bad in ("soon", "-1"):
        with pytest.raises(ConfigError, match="MEMBER_POLL_SECONDS"):
            load(INSTANCE, {"MEMBER_POLL_SECONDS": bad})
