"""`webhook demo`: the README's first command shows a recording flowing through, byte-exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from tests.conftest import free_port

SERVICE_VARIABLES = (
    "DATABASE_URL",
    "ARCHIVE_URL",
    "PLIVO_AUTH_TOKEN",
    "PUBLIC_URL",
    "RECORDING_HOSTS",
)


def test_demo_archives_a_signed_recording_on_the_embedded_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    call = f"run_demo({free_port()}, serve=False, instance_path={str(tmp_path)!r})"
    script = f"import sys; from webhook.demo import run_demo; sys.exit(0 if {call} else 1)"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "signed as Plivo signs -> 200" in done.stdout
    assert "bad signature -> 403" in done.stdout
    assert "archived 1 recording(s)" in done.stdout
    assert done.stdout.count('signed -> 200 {"status":"accepted","conference_action":"enter"}') == 2
    shown = done.stdout[done.stdout.index("api:") : done.stdout.index("audio:")]
    assert '"from": "+14155550101"' in shown and '"from": "+442071838750"' in shown
    assert '"source": "event"' in shown and '"joined_at": "20' in shown
    assert "byte-exact" in done.stdout
    assert "console:   http://127.0.0.1:" in done.stdout and "/console/\n" in done.stdout
    assert "transcription callback, signed -> 200" in done.stdout
    assert '?q="treasury bonds" -> 1 found' in done.stdout
    assert "«treasury" in done.stdout
    assert (tmp_path / "webhook.sqlite3").exists()
    archived = list((tmp_path / "archive").rglob("*.wav"))
    assert len(archived) == 1
    transcripts = list((tmp_path / "archive").rglob("*.transcript.json"))
    assert [t.name.removesuffix(".transcript.json") for t in transcripts] == [
        archived[0].name.removesuffix(".wav")
    ]


def test_demo_stopped_with_sigterm_revokes_its_admin_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    call = f"run_demo({free_port()}, serve=True, instance_path={str(tmp_path)!r})"
    script = f"from webhook.demo import run_demo; {call}"
    with subprocess.Popen(
        [sys.executable, "-u", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as demo:
        try:
            assert demo.stdout is not None
            for line in demo.stdout:
                if "Press Ctrl-C to stop." in line:
                    break
            else:
                raise AssertionError("the demo never started serving")
            demo.send_signal(signal.SIGTERM)
            assert demo.wait(timeout=30) == 0
        finally:
            if demo.poll() is None:
                demo.kill()
    engine = sa.create_engine(f"sqlite:///{tmp_path}/webhook.sqlite3")
    try:
        with engine.connect() as connection:
            active = connection.scalar(
                sa.text("SELECT count(*) FROM staff WHERE revoked_at IS NULL")
            )
            made = connection.scalar(sa.text("SELECT count(*) FROM staff"))
    finally:
        engine.dispose()
    assert (made, active) == (1, 0)
