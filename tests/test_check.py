"""`webhook check` and `/healthz`: readiness from the same checks, details only for the operator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import Result
from flask import Flask

from tests.conftest import AppFactory, free_port, token_for
from tests.fakeplivo import FakePlivo
from webhook.cli import cli
from webhook.db import upgrade
from webhook.models import Role


def bearer(app: Flask, role: Role) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(app, role)}"}


def check(app: Flask) -> Result:
    return app.test_cli_runner().invoke(cli, args=["check"])


def outcomes(result: Result) -> dict[str, str]:
    """`name: detail` lines of the check, keyed by name, each value starting `ok` or `FAIL`."""
    found = {}
    for line in result.output.splitlines():
        if line.startswith(("ok   ", "FAIL ")):
            verdict, _, rest = line.partition(" ")
            name, _, detail = rest.strip().partition(": ")
            found[name] = f"{verdict} {detail}"
    return found


def kms_key(s3_endpoint: str, enabled: bool = True) -> str:
    kms = boto3.client("kms", endpoint_url=s3_endpoint)
    key_id = kms.create_key(Description="archive")["KeyMetadata"]["KeyId"]
    if not enabled:
        kms.disable_key(KeyId=key_id)
    return str(key_id)


def test_everything_configured_passes_and_secrets_are_masked(
    make_app: AppFactory, bucket: str, plivo: FakePlivo, s3: Any
) -> None:
    app = make_app(f"s3://{bucket}/p", METRICS_TOKEN="m" * 32)
    result = check(app)
    assert result.exit_code == 0, result.output
    found = outcomes(result)
    assert list(found) == ["database", "migrations", "archive", "plivo", "public url"]
    assert all(v.startswith("ok") for v in found.values()), found
    assert f"ARCHIVE_URL=s3://{bucket}/p" in result.output
    assert "PLIVO_AUTH_TOKEN=(set, hidden)" in result.output
    assert "METRICS_TOKEN=(set, hidden)" in result.output
    assert plivo.auth_token not in result.output and "m" * 32 not in result.output
    assert "RECORDING_HOSTS_LISTED" not in result.output  # not a variable
    # The probe object is gone again.
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_a_database_password_is_masked(make_app: AppFactory) -> None:
    app = make_app(database=f"postgresql://u:s3cret-pw@127.0.0.1:{free_port()}/x")
    result = check(app)
    assert "s3cret-pw" not in result.output
    assert "DATABASE_URL=postgresql+psycopg://u:***@127.0.0.1" in result.output
    assert result.exit_code == 1
    assert outcomes(result)["database"].startswith("FAIL cannot be reached: OperationalError")


def test_an_unmigrated_database_fails_saying_run_db_upgrade(
    make_app: AppFactory, tmp_path: Path
) -> None:
    app = make_app(database=f"sqlite:///{tmp_path}/never.sqlite3")
    result = check(app)
    assert result.exit_code == 1
    assert outcomes(result)["migrations"].startswith("FAIL the database has no migrations applied")
    assert "run `webhook db upgrade`" in result.output


@pytest.mark.parametrize(
    ("env", "name", "expected"),
    [
        ({"PUBLIC_URL": ""}, "public url", "FAIL PUBLIC_URL is not set"),
        ({"PLIVO_AUTH_ID": "", "PLIVO_AUTH_TOKEN": ""}, "plivo", "FAIL PLIVO_AUTH_ID and"),
        ({"PLIVO_AUTH_TOKEN": "wrong-token"}, "plivo", "FAIL http://127.0.0.1"),
    ],
)
def test_plivo_and_public_url_problems_fail(
    make_app: AppFactory, env: dict[str, str], name: str, expected: str
) -> None:
    result = check(make_app(**env))
    assert result.exit_code == 1
    assert outcomes(result)[name].startswith(expected)


def test_a_bucket_that_does_not_exist_fails(make_app: AppFactory, s3_endpoint: str) -> None:
    result = check(make_app("s3://no-such-bucket-here/p"))
    assert result.exit_code == 1
    assert outcomes(result)["archive"].startswith("FAIL bucket no-such-bucket-here cannot be")


def test_object_lock_asked_of_a_bucket_without_it_fails(make_app: AppFactory, bucket: str) -> None:
    result = check(make_app(f"s3://{bucket}/p", RETENTION_DAYS="1", OBJECT_LOCK_MODE="GOVERNANCE"))
    assert result.exit_code == 1
    assert outcomes(result)["object lock"].startswith("FAIL")


def test_a_usable_kms_key_passes_and_a_disabled_one_fails(
    make_app: AppFactory, bucket: str, s3_endpoint: str
) -> None:
    good = check(make_app(f"s3://{bucket}/p", ARCHIVE_KMS_KEY_ID=kms_key(s3_endpoint)))
    assert good.exit_code == 0, good.output
    assert outcomes(good)["kms key"].startswith("ok")

    disabled = kms_key(s3_endpoint, enabled=False)
    bad = check(make_app(f"s3://{bucket}/p", ARCHIVE_KMS_KEY_ID=disabled))
    assert bad.exit_code == 1
    assert "FAIL" in bad.output and disabled in bad.output


# --- /healthz ------------------------------------------------------------------------------------


def test_healthz_is_200_when_ready_and_names_no_bucket(make_app: AppFactory, bucket: str) -> None:
    response = make_app(f"s3://{bucket}/p").test_client().get("/healthz")
    assert response.status_code == 200
    assert response.json == {
        "status": "ok",
        "checks": {"database": "ok", "archive": "ok", "callbacks": "ok"},
    }


@pytest.mark.parametrize(
    ("env", "check_name", "why"),
    [
        ({"PUBLIC_URL": ""}, "callbacks", "PUBLIC_URL not set"),
        (
            {"PLIVO_AUTH_ID": "", "PLIVO_AUTH_TOKEN": ""},
            "callbacks",
            "PLIVO_AUTH_TOKEN not set",
        ),
        ({"ARCHIVE_URL": "s3://no-such-bucket-here/p"}, "archive", "no-such-bucket-here"),
    ],
)
def test_healthz_is_503_naming_what_is_not_ready_and_why_only_to_an_operator(
    make_app: AppFactory, s3_endpoint: str, env: dict[str, str], check_name: str, why: str
) -> None:
    archive = env.pop("ARCHIVE_URL", None)
    app = make_app(archive, **env)
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.json["checks"][check_name] == "unavailable"
    assert [name for name, v in response.json["checks"].items() if v != "ok"] == [check_name]
    assert "details" not in response.json
    assert "no-such-bucket-here" not in response.get_data(as_text=True)

    operator = app.test_client().get("/healthz", headers=bearer(app, Role.OPERATOR))
    assert operator.status_code == 503
    assert why in operator.json["details"][check_name]


def test_healthz_is_503_when_migrations_are_behind(make_app: AppFactory, tmp_path: Path) -> None:
    never = make_app(database=f"sqlite:///{tmp_path}/never.sqlite3").test_client().get("/healthz")
    assert never.status_code == 503
    assert never.json["checks"]["database"] == "unavailable"
    assert "details" not in never.json

    # A database at an older revision (tables there, alembic_version behind).
    url = f"sqlite:///{tmp_path}/old.sqlite3"
    upgrade(url, "0004")
    old = make_app(database=url)
    behind = old.test_client().get("/healthz")
    assert behind.status_code == 503
    assert behind.json["checks"]["database"] == "unavailable"
    assert "details" not in behind.json
    told = old.test_client().get("/healthz", headers=bearer(old, Role.OPERATOR))
    assert told.status_code == 503
    assert "is at revision 0004" in told.json["details"]["database"]
    assert "webhook db upgrade" in told.json["details"]["database"]


def test_the_local_archive_probe_leaves_nothing_behind(
    make_app: AppFactory, tmp_path: Path
) -> None:
    result = check(make_app(f"file://{tmp_path}/local-archive"))
    assert outcomes(result)["archive"].startswith("ok")
    assert list((tmp_path / "local-archive").iterdir()) == []
