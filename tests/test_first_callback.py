"""From nothing to a signed test callback archived, following only the README: its honcho
recipe with PostgreSQL and an S3-compatible store (moto's server), then "Your first real
callback". The commands are read from the README itself, so the README cannot drift."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import ON_POSTGRES, free_port, fresh_postgres_database
from tests.fakeplivo import FakePlivo
from tests.processes import Deployment, Process, process_env
from webhook.config import normalise_database_url
from webhook.db import make_engine
from webhook.models import Recording, Status
from webhook.testcall import silence_wav

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def readme_commands(section: str) -> list[str]:
    """The commands of the first ```sh block under `## section`, comments stripped."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"## {section}\n")
    block = re.search(r"```sh\n(.*?)```", readme[start:], flags=re.DOTALL)
    assert block is not None, f"no sh block under {section}"
    commands = []
    for line in block.group(1).splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command:
            commands.append(command)
    return commands


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A PostgreSQL database with nothing in it, as `createdb` leaves it."""
    if not ON_POSTGRES:
        pytest.skip("the README's recipe is PostgreSQL's (set TEST_DATABASE_URL)")
    with fresh_postgres_database("webhook_readme") as url:
        yield url


def edit_env(path: Path, values: dict[str, str]) -> None:
    """Set (and uncomment) `NAME=` lines of a .env file, as the operator edits it."""
    text = path.read_text()
    for name, value in values.items():
        text, found = re.subn(
            rf"^#?\s?{name}=.*$", f"{name}={value}", text, count=1, flags=re.MULTILINE
        )
        assert found, f".env.example has no {name} line to edit"
    path.write_text(text)


def run(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", "-c", command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def test_following_the_readme_a_signed_test_callback_is_archived(
    empty_database: str, s3_endpoint: str, s3: Any, plivo: FakePlivo, tmp_path: Path
) -> None:
    app_dir = tmp_path / "checkout"
    app_dir.mkdir()
    for name in ("Procfile", ".env.example"):
        shutil.copy(ROOT / name, app_dir / name)
    # honcho and `webhook` from this checkout's environment; nothing of the developer's shell.
    env = process_env(BIN, tmp_path / "home", {})
    port = free_port()
    recipe = readme_commands("Running locally like production (honcho)")
    first_callback = readme_commands("Your first real callback")
    assert recipe[0] == "cp .env.example .env"
    assert recipe[1].startswith("createdb ")
    run(recipe[0], env, app_dir)
    # "then edit .env": what an operator fills in for their own machine.
    edit_env(
        app_dir / ".env",
        {
            "DATABASE_URL": empty_database,
            "AWS_ENDPOINT_URL": s3_endpoint,
            "PLIVO_AUTH_ID": plivo.auth_id,
            "PLIVO_AUTH_TOKEN": plivo.auth_token,
            "PLIVO_API_URL": plivo.url,
            "PUBLIC_URL": f"http://127.0.0.1:{port}",
            "PORT": str(port),
        },
    )
    # recipe[1], createdb: the fixture made the empty database DATABASE_URL names.
    rest = recipe[2:]
    start = rest.index("honcho start web worker")
    for command in rest[:start]:
        if command.startswith("python "):
            command = f"honcho run {command}"  # as the README says: the AWS_* of .env
        output = run(command, env, app_dir)
        if command == "honcho run webhook check":
            assert "FAIL" not in output.stdout, output.stdout
    logs = tmp_path / "logs"
    logs.mkdir()
    honcho = Process("honcho", rest[start], env, app_dir, logs)
    deployment = Deployment(f"http://127.0.0.1:{port}", [honcho])
    try:
        with deployment.logs_on_failure():
            deployment.wait_until_healthy(timeout=60)
            (command,) = first_callback
            assert command == "honcho run webhook send-test-callback --wait 60"
            output = run(command, env, app_dir).stdout
            assert " -> 200 " in output and "archived as plivo/recordings/" in output, output
    finally:
        deployment.stop()

    engine = make_engine(normalise_database_url(empty_database))
    try:
        with engine.connect() as connection:
            recording = connection.execute(select(Recording)).one()
    finally:
        engine.dispose()
    assert recording.recording_id.startswith("test-")
    assert recording.status == Status.ARCHIVED
    stored = s3.get_object(Bucket="archive", Key=recording.archive_key)["Body"].read()
    assert stored == silence_wav()
    assert recording.archive_key.startswith("plivo/recordings/")  # .env.example's prefix
