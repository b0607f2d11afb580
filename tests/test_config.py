"""Settings come from the environment, in one place, and bad values are refused at start."""

from __future__ import annotations

import pytest
from sqlalchemy.pool import QueuePool

from webhook import create_app, services
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
            "ARCHIVE_URL": "s3://archive-bucket",
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
        INSTANCE,
        {"DYNO": "web.1", "DATABASE_URL": "postgres://h/d", "ARCHIVE_URL": "s3://archive-b/p"},
    )
    assert settings.archive_url == "s3://archive-b/p"


def test_presigned_links_never_outlive_five_minutes() -> None:
    with pytest.raises(ConfigError, match="PRESIGN_SECONDS must be at most 300"):
        load(INSTANCE, {"PRESIGN_SECONDS": "3600"})
    assert load(INSTANCE, {"PRESIGN_SECONDS": "300"}).presign_seconds == 300
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


def test_database_pool_size_defaults_to_20_connections_a_process() -> None:
    assert load(INSTANCE, {}).database_pool_size == 20
    settings = load(
        INSTANCE,
        {
            "DATABASE_URL": "postgresql://u@127.0.0.1:1/x",
            "ARCHIVE_URL": "s3://archive-bucket/recordings",
            "DATABASE_POOL_SIZE": "7",
        },
    )
    assert settings.database_pool_size == 7
    # The app's engine keeps at most that many (nothing connects until a request needs it).
    app = create_app({"SETTINGS": settings})
    engine = services(app).engine
    try:
        assert isinstance(engine.pool, QueuePool)
        assert engine.pool.size() == 7
    finally:
        engine.dispose()


def test_member_poll_seconds_defaults_to_a_minute_and_zero_turns_it_off() -> None:
    assert load(INSTANCE, {}).member_poll_seconds == 60
    assert load(INSTANCE, {"MEMBER_POLL_SECONDS": "5"}).member_poll_seconds == 5
    assert load(INSTANCE, {"MEMBER_POLL_SECONDS": "0"}).member_poll_seconds == 0
    for bad in ("soon", "-1"):
        with pytest.raises(ConfigError, match="MEMBER_POLL_SECONDS"):
            load(INSTANCE, {"MEMBER_POLL_SECONDS": bad})


# --- misconfigurations that would lose recordings or refuse every callback ---------------------

PLATFORM = {"DYNO": "web.1", "DATABASE_URL": "postgres://h/d", "ARCHIVE_URL": "s3://archive-b/p"}


@pytest.mark.parametrize(
    ("env", "sentence"),
    [
        (
            {"ARCHIVE_URL": "my-bucket"},
            "ARCHIVE_URL 'my-bucket' has no scheme; write s3://my-bucket",
        ),
        ({"ARCHIVE_URL": "s3://"}, "ARCHIVE_URL 's3://' names no bucket"),
        ({"ARCHIVE_URL": "s3:/my-bucket"}, "names no bucket"),
        ({"ARCHIVE_URL": "gs://bucket/p"}, "ARCHIVE_URL must be s3://BUCKET/PREFIX or file:///"),
        ({"ARCHIVE_URL": "s3://My_Bucket/p"}, "not an S3 bucket name"),
        ({"ARCHIVE_URL": "file://localhost/srv/archive"}, "is not an absolute folder"),
        ({"ARCHIVE_URL": "file://relative/dir"}, "is not an absolute folder"),
        ({**PLATFORM, "ARCHIVE_URL": "file:///app/archive"}, "ARCHIVE_URL is a local folder"),
        ({**PLATFORM, "DATABASE_URL": "sqlite:////app/x.db"}, "DATABASE_URL is SQLite"),
        ({"DATABASE_URL": "mysql://u@h/d"}, "DATABASE_URL must be a PostgreSQL"),
        ({"DATABASE_URL": "db.example.com"}, "DATABASE_URL is not a database URL"),
        ({"PUBLIC_URL": "archive.example.com"}, "PUBLIC_URL must be an absolute URL"),
        ({"PUBLIC_URL": "https://"}, "PUBLIC_URL must be an absolute URL"),
        ({"PUBLIC_URL": "ftp://archive.example.com"}, "PUBLIC_URL must be an absolute URL"),
        ({"PUBLIC_URL": "https://archive.example.com/?x=1"}, "PUBLIC_URL must be a base URL"),
        ({"PUBLIC_URL": "https://archive.example.com:port"}, "PUBLIC_URL has a bad port"),
        ({"PLIVO_API_URL": "api.plivo.com"}, "PLIVO_API_URL must be an absolute URL"),
        ({"PLIVO_AUTH_ID": "MA123"}, "PLIVO_AUTH_ID is set without PLIVO_AUTH_TOKEN"),
        ({"RECORDING_HOSTS": "https://media.plivo.com"}, "RECORDING_HOSTS lists host names only"),
        ({"RECORDING_HOSTS": "media.plivo.com:443"}, "RECORDING_HOSTS lists host names only"),
        ({"METRICS_TOKEN": "short"}, "METRICS_TOKEN must be at least 16 characters"),
        (
            {"OBJECT_LOCK_MODE": "COMPLIANCE", "RETENTION_DAYS": "30"},
            "OBJECT_LOCK_MODE needs an S3 archive",
        ),
        ({"ARCHIVE_KMS_KEY_ID": "alias/archive"}, "ARCHIVE_KMS_KEY_ID needs an S3 archive"),
        ({"PRESIGN_SECONDS": "0"}, "PRESIGN_SECONDS must be at least 1"),
        ({"MAX_CALLBACK_BYTES": "1k"}, "MAX_CALLBACK_BYTES must be a whole number"),
        ({"RECONCILE_INTERVAL_SECONDS": "-1"}, "RECONCILE_INTERVAL_SECONDS must be at least 0"),
        ({"TRUSTED_PROXY_HOPS": "6"}, "TRUSTED_PROXY_HOPS must be at most 5, got 6"),
        ({"TRUSTED_PROXY_HOPS": "one"}, "TRUSTED_PROXY_HOPS must be a whole number"),
        ({"CONSOLE_IDLE_MINUTES": "soon"}, "CONSOLE_IDLE_MINUTES must be a number"),
        ({"CONSOLE_IDLE_MINUTES": "0"}, "CONSOLE_IDLE_MINUTES must be above 0"),
        ({"AUTO_RECORD": "*"}, "AUTO_RECORD needs PUBLIC_URL"),
        ({"AUTO_RECORD_INTERVAL_SECONDS": "0"}, "AUTO_RECORD_INTERVAL_SECONDS must be at least 1"),
        (
            {"RECORDING_NOTICE_TEXT": "Recorded.", "RECORDING_NOTICE_URL": "https://x.test/n.mp3"},
            "set RECORDING_NOTICE_TEXT or RECORDING_NOTICE_URL, not both",
        ),
        ({"RECORDING_NOTICE_TEXT": "a\tb"}, "RECORDING_NOTICE_TEXT must be at most"),
        ({"RECORDING_NOTICE_URL": "notice.mp3"}, "RECORDING_NOTICE_URL must be an absolute"),
        ({"RECORDING_NOTICE_VOICE": "robot"}, "RECORDING_NOTICE_VOICE must be one of WOMAN, MAN"),
        ({"RECORDING_NOTICE_LANGUAGE": "English"}, "RECORDING_NOTICE_LANGUAGE must look like"),
        ({"DELETE_FROM_PLIVO_AFTER_DAYS": "-1"}, "DELETE_FROM_PLIVO_AFTER_DAYS must be a number"),
        ({"DELETE_FROM_PLIVO_AFTER_DAYS": "nan"}, "DELETE_FROM_PLIVO_AFTER_DAYS must be a number"),
        ({"DATABASE_POOL_SIZE": "0"}, "DATABASE_POOL_SIZE must be at least 1"),
        ({"DATABASE_POOL_SIZE": "many"}, "DATABASE_POOL_SIZE must be a whole number"),
        ({"MEDIA_MAX_BYTES": "2GB"}, "MEDIA_MAX_BYTES must be a whole number"),
        ({"MEDIA_MAX_BYTES": "100"}, "MEDIA_MAX_BYTES must be at least 1024"),
        ({"MEDIA_DEADLINE_SECONDS": "0"}, "MEDIA_DEADLINE_SECONDS must be at least 1"),
        ({"MEDIA_READ_TIMEOUT_SECONDS": "0"}, "MEDIA_READ_TIMEOUT_SECONDS must be at least 1"),
        ({"MEDIA_MIN_BYTES_PER_SECOND": "-1"}, "MEDIA_MIN_BYTES_PER_SECOND must be at least 0"),
    ],
)
def test_each_misconfiguration_is_refused_with_a_sentence_naming_it(
    env: dict[str, str], sentence: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load(INSTANCE, env)
    assert sentence in str(refused.value)
    assert "\n" not in str(refused.value)


def test_well_formed_settings_are_accepted() -> None:
    settings = load(
        INSTANCE,
        {
            **PLATFORM,
            "ARCHIVE_URL": "s3://archive-bucket/prod",
            "PUBLIC_URL": "https://archive.example.com/base/",
            "RECORDING_HOSTS": "media.plivo.com,*.example.com,::1,127.0.0.1",
            "METRICS_TOKEN": "x" * 16,
            "ARCHIVE_KMS_KEY_ID": "alias/archive",
            "PLIVO_AUTH_ID": "MA1",
            "PLIVO_AUTH_TOKEN": "t",
        },
    )
    assert settings.public_url == "https://archive.example.com/base"
    assert settings.metrics_token == "x" * 16
    assert settings.archive_kms_key_id == "alias/archive"
    assert load(INSTANCE, {"ARCHIVE_URL": "file:///srv/archive"}).archive_url.startswith("file:")
