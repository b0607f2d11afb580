"""app.json, .env.example and the README document every setting the code reads, and no other."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import webhook.config
from tests.processes import read_procfile
from webhook.config import load

ROOT = Path(__file__).resolve().parent.parent
# Read by config.py but set by the platform or an add-on, never by the operator in app.json.
PLATFORM_SET = {"DYNO", "DATABASE_URL"}
# Read by boto3 or gunicorn themselves, not by config.py: documented, never required to be read.
READ_BY_LIBRARIES = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "WEB_CONCURRENCY",
    "PORT",
}


class ReadRecorder(Mapping[str, str]):
    """An empty environment that remembers every name asked of it."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(key)
        return default

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def settings_read_by_the_code() -> set[str]:
    """Every variable config.py reads: those asked of an empty environment, and every name
    passed to an environment read in its source (reads that happen only when another is set)."""
    recorder = ReadRecorder()
    load("/nonexistent-instance", recorder)
    source = Path(webhook.config.__file__).read_text()
    named = re.findall(r'env(?:\.get\(|\[|, )\s*"([A-Z][A-Z0-9_]*)"', source)
    return recorder.asked | set(named)


def app_json() -> dict:  # type: ignore[type-arg]
    return json.loads((ROOT / "app.json").read_text())


def env_example_names() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#?\s?([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))


def test_the_code_reads_the_settings_this_test_knows_of() -> None:
    # A sanity floor: if the scan found nothing, every test below would pass for nothing.
    assert {"DATABASE_URL", "ARCHIVE_URL", "PUBLIC_URL", "METRICS_TOKEN"} <= (
        settings_read_by_the_code()
    )


def test_app_json_describes_every_setting_the_code_reads() -> None:
    env = app_json()["env"]
    missing = settings_read_by_the_code() - PLATFORM_SET - set(env)
    assert missing == set(), f"add to app.json's env: {sorted(missing)}"
    stale = set(env) - settings_read_by_the_code() - READ_BY_LIBRARIES
    assert stale == set(), f"app.json names settings nothing reads: {sorted(stale)}"
    for name, entry in env.items():
        assert entry.get("description"), f"{name} has no description in app.json"


def test_env_example_lists_every_setting_the_code_reads() -> None:
    names = env_example_names()
    missing = settings_read_by_the_code() - {"DYNO"} - names
    assert missing == set(), f"add to .env.example: {sorted(missing)}"
    assert names - settings_read_by_the_code() - READ_BY_LIBRARIES == set()


def test_the_readme_documents_every_setting_the_code_reads() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = {n for n in settings_read_by_the_code() - {"DYNO"} if f"`{n}`" not in readme}
    assert missing == set(), f"document in the README's Configuration: {sorted(missing)}"


def test_app_json_provides_the_database_and_runs_every_long_lived_process() -> None:
    document = app_json()
    assert any(a["plan"].startswith("heroku-postgresql") for a in document["addons"])
    processes = set(read_procfile(ROOT / "Procfile")) - {"release"}
    assert set(document["formation"]) == processes


def test_env_example_as_written_is_a_configuration_the_service_accepts() -> None:
    text = (ROOT / ".env.example").read_text()
    env = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, flags=re.MULTILINE))
    assert load("/nonexistent-instance", env).archive_url == env["ARCHIVE_URL"]
    # On a dyno too, with the add-on's database.
    load("/nonexistent-instance", {**env, "DYNO": "web.1"})
