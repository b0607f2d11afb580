"""The `webhook` command: Flask's CLI (run, shell, routes) plus the service's own commands."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from importlib.metadata import version
from typing import Any, NoReturn

import click
import requests
from flask import current_app
from flask.cli import AppGroup, FlaskGroup
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from tqdm import tqdm

from webhook import create_app, logs, services
from webhook.archive.reconcile import reconcile, reconcile_history
from webhook.archive.storage import ObjectLockMissing, StorageError, check_object
from webhook.archive.transcripts import count_lacking, fetch_transcripts, order_transcripts
from webhook.archive.worker import Worker
from webhook.auth import add_staff, revoke_staff, rotate_staff
from webhook.check import effective_settings, run_checks
from webhook.config import ConfigError
from webhook.db import (
    NOT_MIGRATED,
    UPGRADE_HINT,
    is_schema_missing,
    migrations_pending,
    transaction,
    upgrade,
)
from webhook.errors import APIError, BadParameter, PlivoError
from webhook.models import Recording, Role, Staff, Status, Transcript
from webhook.recordings import requeue
from webhook.search import parse_time
from webhook.testcall import send_test_callback

cli = FlaskGroup(
    create_app=create_app, help="Plivo conference recording archive.", add_version_option=False
)
click.version_option(version("webhook"), prog_name="webhook", message="%(prog)s %(version)s")(cli)
db_cli = AppGroup("db", help="The database schema (Alembic migrations).")
staff_cli = AppGroup("staff", help="Staff API tokens.")
transcripts_cli = AppGroup("transcripts", help="Transcripts from Plivo for recordings lacking one.")
cli.add_command(db_cli)
cli.add_command(staff_cli)
cli.add_command(transcripts_cli)


def main() -> None:
    """Entry point of the `webhook` console script: failures are one line and a hint."""
    try:
        cli.main(prog_name="webhook")
    except ConfigError as exc:
        _fail(exc, str(exc), "fix that variable in the environment, then run `webhook check`")
    except DBAPIError as exc:
        if is_schema_missing(exc):
            _fail(exc, NOT_MIGRATED, UPGRADE_HINT)
        first_line = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else ""
        _fail(
            exc,
            f"database error: {type(exc.orig).__name__}: {first_line}",
            "check DATABASE_URL and that the database is running, then `webhook check`",
        )
    except StorageError as exc:
        _fail(exc, f"archive: {exc}", "check ARCHIVE_URL and the AWS_* settings (`webhook check`)")
    except APIError as exc:
        _fail(exc, exc.message, "`webhook check` tests the Plivo credentials")


def _fail(exc: BaseException, message: str, hint: str) -> NoReturn:
    """Show the trace with `webhook --debug …` (or FLASK_DEBUG=1), else one line and a hint."""
    if os.environ.get("FLASK_DEBUG", "").lower() in ("1", "true", "yes"):
        raise exc
    click.secho(f"Error: {message}", err=True, fg="red")
    click.echo(f"Hint: {hint} (`webhook --debug ...` shows the trace)", err=True)
    sys.exit(1)


def _progress(total: int | None, what: str) -> Any:
    # A bar on a terminal only; logs and pipes get the summary line alone.
    return tqdm(total=total, unit=what, disable=not sys.stderr.isatty(), file=sys.stderr)


@db_cli.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply the Alembic migrations in migrations/."""
    url = services(current_app).settings.database_url
    upgrade(url, revision)
    click.echo(f"database at revision {revision}")


@cli.command("worker")
@click.option("--once", is_flag=True, help="Archive whatever is due now, then exit.")
def worker(once: bool) -> None:
    """Run the archive worker (SIGTERM finishes or gives back the current job, then exits)."""
    logs.configure()
    svc = services(current_app)
    try:
        pending = migrations_pending(svc.engine)
    except DBAPIError as exc:
        pending = None  # a database outage: the loop waits for it, as for one that comes later
        click.echo(f"warning: database not reachable yet ({type(exc.orig).__name__})", err=True)
    if pending:
        raise click.ClickException(pending)
    try:
        # Refuse to start rather than archive without the retention the operator asked for.
        svc.storage.check()
    except ObjectLockMissing as exc:
        raise click.ClickException(str(exc)) from None
    except StorageError as exc:
        click.echo(f"warning: archive not reachable yet ({exc}); retrying per job", err=True)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # What start-up built since the imports (`webhook.main` froze those: the app, the S3
    # client's service model) lives as long as the process too: kept out of every later garbage
    # collection, including the ones at exit. Not for an app under test, whose process is the
    # test runner's.
    if not current_app.testing:
        gc.freeze()
    done = Worker(svc, stop).run(once=once)
    if once:
        click.echo(f"archive worker ran {done} job(s)")


@staff_cli.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice([r.value for r in Role]), required=True)
def staff_add(name: str, role: str) -> None:
    """Create a staff token; the token is printed once, alone on the last line."""
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise click.BadParameter("NAME must be 1 to 64 printable characters")
    sessions = services(current_app).sessions
    with transaction(sessions) as session:
        active = select(Staff).where(Staff.name == name, Staff.revoked_at.is_(None))
        if session.scalars(active).first() is not None:
            raise click.ClickException(
                f"staff {name!r} exists already (revoke it, rotate its token, or pick a name)"
            )
        token = add_staff(session, name, Role(role))
    click.echo(f"Created {name} ({role}). The token is shown only now:")
    click.echo(token)


@staff_cli.command("list")
def staff_list() -> None:
    """List staff, their roles and whether their token is revoked."""
    with transaction(services(current_app).sessions) as session:
        for staff in session.scalars(select(Staff).order_by(Staff.name, Staff.id)):
            state = f"revoked {staff.revoked_at:%Y-%m-%d}" if staff.revoked_at else "active"
            click.echo(f"{staff.name}\t{staff.role}\t{state}\tcreated {staff.created_at:%Y-%m-%d}")


@staff_cli.command("rotate")
@click.argument("name")
def staff_rotate(name: str) -> None:
    """Give NAME a new token and revoke the old one; the token is printed alone on the last line."""
    with transaction(services(current_app).sessions) as session:
        token = rotate_staff(session, name)
        if token is None:
            raise click.ClickException(f"no active staff named {name!r}")
    click.echo(f"Rotated {name}: the old token no longer works. The new one is shown only now:")
    click.echo(token)


@staff_cli.command("revoke")
@click.argument("name")
def staff_revoke(name: str) -> None:
    """Revoke a staff member's token."""
    with transaction(services(current_app).sessions) as session:
        if not revoke_staff(session, name):
            raise click.ClickException(f"no active staff named {name!r}")
    click.echo(f"revoked {name}")


@cli.command("check")
def check_command() -> None:
    """Print the effective configuration (secrets masked) and check each dependency."""
    svc = services(current_app)
    for name, value in effective_settings(svc.settings):
        click.echo(f"{name}={value}")
    click.echo("")
    failed = 0
    for outcome in run_checks(svc):
        failed += not outcome.ok
        click.echo(f"{'ok  ' if outcome.ok else 'FAIL'} {outcome.name}: {outcome.detail}")
    if failed:
        click.echo(f"{failed} check(s) failed", err=True)
        sys.exit(1)


@cli.command("send-test-callback")
@click.option(
    "--wait",
    default=0,
    show_default=True,
    help="Seconds to wait for the worker to archive it (0: do not wait).",
)
def send_test_callback_command(wait: int) -> None:
    """Send a correctly signed test recording callback to the running service at PUBLIC_URL."""
    svc = services(current_app)
    settings = svc.settings
    if not (settings.public_url and settings.plivo_auth_token):
        raise click.ClickException("PUBLIC_URL and PLIVO_AUTH_TOKEN must be set (`webhook check`)")
    try:
        sent = send_test_callback(settings)
    except requests.RequestException as exc:
        raise click.ClickException(
            f"{settings.public_url} cannot be reached ({type(exc).__name__}); is `web` running "
            "there, and is PUBLIC_URL its public address?"
        ) from None
    click.echo(f"POST {sent.url} -> {sent.status} {sent.body.strip()}")
    if sent.status == 403:
        raise click.ClickException(
            "the service refused the signature: PLIVO_AUTH_TOKEN or PUBLIC_URL differ between "
            "here and the running service (its log line `callback refused` shows checked_url)"
        )
    if sent.status != 200:
        raise click.ClickException(f"the service answered {sent.status}, not 200")
    click.echo(f"recording {sent.recording_id} accepted and queued")
    if wait <= 0:
        return
    deadline = time.monotonic() + wait
    while True:
        with transaction(svc.sessions) as session:
            recording = session.scalars(
                select(Recording).where(Recording.recording_id == sent.recording_id)
            ).one_or_none()
        state = recording.status if recording else "missing"
        if recording is not None and recording.status == Status.ARCHIVED:
            click.echo(
                f"archived as {recording.archive_key} ({recording.archive_size} bytes, "
                f"sha256 {recording.archive_sha256})"
            )
            return
        if state == Status.FAILED or time.monotonic() > deadline:
            error = recording.last_error if recording else "no such recording in DATABASE_URL"
            raise click.ClickException(
                f"not archived: {state} ({error}); is `webhook worker` running?"
            )
        time.sleep(0.5)


@cli.command("requeue")
@click.argument("recording_id", required=False)
@click.option("--failed", is_flag=True, help="Requeue every failed recording.")
def requeue_command(recording_id: str | None, failed: bool) -> None:
    """Put a recording (or every failed one) back on the archive queue."""
    if bool(recording_id) == failed:
        raise click.UsageError("give either RECORDING_ID or --failed")
    condition = (
        Recording.status == Status.FAILED if failed else Recording.recording_id == recording_id
    )
    with transaction(services(current_app).sessions) as session:
        count = requeue(session, condition)
    if recording_id and not count:
        raise click.ClickException(f"{recording_id} is not a failed or pending recording")
    click.echo(f"requeued {count} recording(s)")


@cli.command("reconcile")
@click.option(
    "--since",
    help="Recordings Plivo added at or after this ISO-8601 time, however long ago (default: "
    "Plivo's last 7 days). Resumes where an interrupted run with the same --since stopped.",
)
def reconcile_command(since: str | None) -> None:
    """Queue every recording Plivo has that the archive lacks (callbacks that never came)."""
    after = None
    if since:
        try:
            after = parse_time("since", since)
        except BadParameter as exc:
            raise click.BadParameter(exc.message, param_hint="--since") from None
    with _progress(None, "recording") as bar:
        svc = services(current_app)

        def progress() -> None:
            bar.update(1)

        def warn(line: str) -> None:
            click.echo(line, err=True)

        try:
            if after is None:
                result = reconcile(svc, progress=progress, warn=warn)
            else:
                result = reconcile_history(svc, after, progress=progress, warn=warn)
        except PlivoError as exc:
            raise click.ClickException(
                f"Plivo: {exc.message} (after {bar.n} recordings; run the same command again "
                "to resume)"
            ) from None
    if result.resumed_at is not None:
        click.echo(f"reconcile: resumed at {result.resumed_at:%Y-%m-%dT%H:%M:%SZ}")
    click.echo(result.summary())


def _since_ms(since: str | None) -> int | None:
    if not since:
        return None
    try:
        return int(parse_time("since", since).timestamp() * 1000)
    except BadParameter as exc:
        raise click.BadParameter(exc.message, param_hint="--since") from None


@transcripts_cli.command("fetch")
@click.option("--since", help="Only recordings that started at or after this ISO-8601 time.")
def transcripts_fetch(since: str | None) -> None:
    """Fetch from Plivo the transcripts it has for recordings that lack one."""
    since_ms = _since_ms(since)
    svc = services(current_app)
    total = count_lacking(svc, since_ms, ordered_too=True)
    with _progress(total, "recording") as bar:
        try:
            result = fetch_transcripts(
                svc, since_ms, progress=lambda: bar.update(1), warn=tqdm.write
            )
        except PlivoError as exc:
            raise click.ClickException(f"Plivo: {exc.message} (after {bar.n} recordings)") from None
    click.echo(result.summary())


@transcripts_cli.command("order")
@click.option("--since", help="Only recordings that started at or after this ISO-8601 time.")
@click.option("--yes", is_flag=True, help="Order them (Plivo charges per transcript).")
def transcripts_order(since: str | None, yes: bool) -> None:
    """Ask Plivo to transcribe archived recordings that have no transcript (costs money)."""
    since_ms = _since_ms(since)
    svc = services(current_app)
    total = count_lacking(svc, since_ms, ordered_too=False)
    if not yes:
        click.echo(
            f"{total} archived recording(s) have no transcript; Plivo charges for each one "
            "transcribed. Run again with --yes to order them."
        )
        return
    click.echo(f"ordering transcripts of {total} recording(s)")
    with _progress(total, "recording") as bar:
        try:
            result = order_transcripts(
                svc, since_ms, progress=lambda: bar.update(1), warn=tqdm.write
            )
        except PlivoError as exc:
            raise click.ClickException(f"Plivo: {exc.message} (after {bar.n} recordings)") from None
    click.echo(result.summary())


@cli.command("verify")
def verify() -> None:
    """Re-read every archived object (audio and transcripts), compare its SHA-256 and size;
    exit 1 on any mismatch."""
    svc = services(current_app)
    with transaction(svc.sessions) as session:
        rows = list(
            session.execute(
                select(
                    Recording.recording_id,
                    Recording.archive_key,
                    Recording.archive_version_id,
                    Recording.archive_size,
                    Recording.archive_sha256,
                )
                .where(Recording.status == Status.ARCHIVED, Recording.archive_key.is_not(None))
                .order_by(Recording.id)
            ).all()
        )
        # Transcripts archived beside the audio, under the SHA-256 on file since receipt.
        rows += session.execute(
            select(
                Transcript.recording_id + " (transcript)",
                Transcript.archive_key,
                Transcript.archive_version_id,
                Transcript.archive_size,
                Transcript.sha256,
            )
            .where(Transcript.archived_at.is_not(None))
            .order_by(Transcript.id)
        ).all()
    bad = 0
    with _progress(len(rows), "object") as bar:
        for recording_id, key, version_id, size, sha256 in rows:
            try:
                problem = check_object(svc.storage, str(key), version_id, size, sha256)
            except StorageError as exc:
                bad += 1
                tqdm.write(f"MISSING {recording_id} {key}: {exc}")
                continue
            finally:
                bar.update(1)
            if problem is not None:
                bad += 1
                tqdm.write(f"MISMATCH {recording_id} {key}: {problem}")
    click.echo(f"verify: {len(rows)} object(s) checked, {bad} mismatch(es)")
    if bad:
        sys.exit(1)


@cli.command("demo", with_appcontext=False)
@click.option("--port", default=5000, show_default=True, help="Port to serve on.")
@click.option("--no-serve", is_flag=True, help="Exit after showing the recording.")
def demo(port: int, no_serve: bool) -> None:
    """Run the service on its embedded defaults and push one signed recording through it."""
    from webhook.demo import run_demo

    if not run_demo(port, serve=not no_serve):
        sys.exit(1)
