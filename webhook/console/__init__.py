"""The staff console: server-rendered pages over the same queries, actions, roles and audit log
as the JSON API, for compliance officers in a browser."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar
from urllib.parse import urlencode, urlsplit

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from webhook import actions, services
from webhook.audit import audit_page, note_recordings, write_audit
from webhook.auth import staff_for_token
from webhook.console import present
from webhook.console.sessions import (
    CSRF_FIELD,
    cookie_name,
    csrf_token,
    csrf_valid,
    end_session,
    open_session,
    resume,
)
from webhook.db import request_session
from webhook.errors import APIError
from webhook.models import Role, Status
from webhook.recordings import legal_hold_history, to_json
from webhook.search import recordings_page
from webhook.transcripts import find as find_transcript
from webhook.transcripts import to_json as transcript_json

bp = Blueprint(
    "console",
    __name__,
    url_prefix="/console",
    template_folder="templates",
    static_folder="static",
)
bp.add_app_template_filter(present.when, "when")
bp.add_app_template_filter(present.duration, "duration")
bp.add_app_template_filter(present.size, "size")
bp.add_app_template_filter(present.highlight, "highlight")
bp.add_app_template_filter(present.marked, "marked")

P = ParamSpec("P")
R = TypeVar("R")

# Pages load nothing but this origin's stylesheet and one small script file (no inline script);
# audio may also come from the archive's presigned links, whose origin the recording page adds.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "media-src 'self'{media}; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SEARCH_FIELDS = (
    "participant",
    "conference",
    "conference_prefix",
    "since",
    "until",
    "status",
    "min_duration",
    "max_duration",
    "legal_hold",
    "notified",
    "retained_until_after",
    "retained_until_before",
    "q",
    "limit",
)


class ConsoleError(APIError):
    """A refusal shown as a console page (not JSON)."""


def _secure() -> bool:
    public_url = services(current_app).settings.public_url or ""
    return public_url.startswith("https://")


def _is_console_page() -> bool:
    # The request itself, not its proxy: the after-request hook asks this of every request,
    # callbacks included.
    path = request._get_current_object().path  # type: ignore[attr-defined]
    return (path == "/console" or path.startswith("/console/")) and not path.startswith(
        "/console/static/"
    )


@bp.before_request
def _load_session() -> ResponseReturnValue | None:
    """Find the signed-in staff member, and refuse a form sent from another site or without the
    session's CSRF token."""
    g.console_staff = None
    g.console_session_id = None
    if request.endpoint == "console.static":
        return None
    raw = request.cookies.get(cookie_name(_secure()))
    if raw:
        session = request_session()
        staff = resume(session, raw, services(current_app).settings.console_idle_minutes)
        session.commit()
        if staff is not None:
            g.console_staff = staff
            g.console_session_id = raw
            g.staff_name = staff.name
            g.staff_role = staff.role
    if request.method == "POST":
        # Browsers say where a request came from; a form posted by another site is refused
        # before anything else (this also covers the sign-in form, which has no session yet).
        if request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
            raise ConsoleError(403, "cross_site", "This form was sent from another site.")
        if request.endpoint != "console.sign_in" and (
            g.console_session_id is None
            or not csrf_valid(g.console_session_id, request.form.get(CSRF_FIELD))
        ):
            raise ConsoleError(
                403,
                "csrf_failed",
                "This form has expired or did not come from this console; open the page again.",
            )
    return None


def signed_in(*roles: Role) -> Callable[[Callable[P, R]], Callable[P, R | BaseResponse]]:
    """Let a view run for a signed-in staff member holding one of `roles` (admin may do
    everything); others go to the sign-in page, or get 403."""

    def decorator(view: Callable[P, R]) -> Callable[P, R | BaseResponse]:
        @wraps(view)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | BaseResponse:
            staff = g.console_staff
            if staff is None:
                if request.method != "GET":
                    raise ConsoleError(401, "unauthorized", "Sign in first.")
                return redirect(url_for("console.sign_in", next=request.full_path.rstrip("?")))
            if staff.role != Role.ADMIN and staff.role not in roles:
                raise ConsoleError(
                    403,
                    "forbidden",
                    f"This page needs the {' or '.join(roles)} role; {staff.name} is {staff.role}.",
                )
            return view(*args, **kwargs)

        return wrapper

    return decorator


@bp.app_context_processor
def _console_context() -> dict[str, object]:
    if not request or not _is_console_page():
        return {}
    raw = g.get("console_session_id")
    staff = g.get("console_staff")
    return {
        "staff": staff,
        "is_admin": staff is not None and staff.role == Role.ADMIN,
        "csrf_field": CSRF_FIELD,
        "csrf_token": csrf_token(raw) if raw else "",
    }


def _error_page(status: int, message: str) -> Response:
    response = current_app.make_response(
        (render_template("console/error.html", status=status, message=message), status)
    )
    return response


@bp.errorhandler(APIError)
def _api_error(exc: APIError) -> Response:
    return _error_page(exc.status, exc.message)


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    return _error_page(exc.code or 500, exc.description or exc.name)


@bp.after_app_request
def _console_response(response: Response) -> Response:
    """Console pages are never cached, run no script, cannot be framed, and are audited."""
    if not _is_console_page():
        return response
    media = g.get("console_media_origin")
    response.headers["Content-Security-Policy"] = CSP.format(media=f" {media}" if media else "")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    # Search filters (a participant's number) are in page URLs: they go nowhere else.
    response.headers["Referrer-Policy"] = "no-referrer"
    return write_audit(
        response,
        lambda: _error_page(503, "The access could not be written to the audit log."),
    )


def _given(*names: str) -> dict[str, str]:
    """The query-string parameters among `names` that have a value."""
    return {name: request.args[name] for name in names if request.args.get(name)}


def _next_page(endpoint: str, args: dict[str, str], cursor: str | None) -> str | None:
    """The next page's address: the same filters, the next cursor."""
    if cursor is None:
        return None
    query = {k: v for k, v in args.items() if k != "cursor"} | {"cursor": cursor}
    return url_for(endpoint) + "?" + urlencode(query)


# --- signing in and out -------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a console page of this site, never elsewhere."""
    fallback = url_for("console.search")
    if not target:
        return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target or not target.startswith("/console/"):
        return fallback
    return target


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> ResponseReturnValue:
    """A staff token, typed once, opens a session."""
    if request.method == "GET":
        return render_template("console/sign_in.html", next=request.args.get("next", ""))
    token = request.form.get("token", "").strip()
    next_page = request.form.get("next", "")
    session = request_session()
    staff = staff_for_token(session, token) if token else None
    if staff is None or staff.role not in (Role.COMPLIANCE, Role.ADMIN):
        message = (
            "That token is unknown or revoked."
            if staff is None
            else f"The console is for compliance and admin staff; {staff.name} is {staff.role}."
        )
        status = 401 if staff is None else 403
        return render_template("console/sign_in.html", next=next_page, error=message), status
    settings = services(current_app).settings
    if g.console_session_id is not None:
        end_session(session, g.console_session_id)  # one browser, one session
    raw = open_session(session, staff, settings.console_idle_minutes)
    session.commit()
    g.staff_name = staff.name
    g.staff_role = staff.role
    response = redirect(_safe_next(next_page), 303)
    secure = _secure()
    response.set_cookie(
        cookie_name(secure), raw, httponly=True, secure=secure, samesite="Lax", path="/"
    )
    return response


@bp.post("/sign-out")
@signed_in(Role.COMPLIANCE)
def sign_out() -> ResponseReturnValue:
    """End the session now."""
    session = request_session()
    end_session(session, g.console_session_id)
    session.commit()
    response = redirect(url_for("console.sign_in", signed_out="1"), 303)
    secure = _secure()
    response.delete_cookie(cookie_name(secure), path="/", secure=secure, samesite="Lax")
    return response


# --- compliance: search, read, listen -----------------------------------------------------------


@bp.get("/")
@signed_in(Role.COMPLIANCE)
def search() -> ResponseReturnValue:
    """Every filter of GET /api/recordings, newest first, a page at a time."""
    args = {
        name: request.args[name] for name in (*SEARCH_FIELDS, "cursor") if request.args.get(name)
    }
    recordings: list[dict[str, object]] = []
    next_cursor = None
    error = None
    try:
        recordings, next_cursor = recordings_page(request_session(), args)
    except APIError as exc:
        error = exc.message
    note_recordings(*(str(r["recording_id"]) for r in recordings))
    return render_template(
        "console/search.html",
        args=args,
        recordings=recordings,
        next_url=_next_page("console.search", args, next_cursor),
        error=error,
        statuses=[s.value for s in Status],
        q=args.get("q"),
    ), 400 if error else 200


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@bp.get("/recordings/<recording_id>")
@signed_in(Role.COMPLIANCE)
def recording(recording_id: str) -> ResponseReturnValue:
    """One recording: metadata, participants, player, transcript, archive facts, holds."""
    found = actions.get_recording(recording_id)
    body = to_json(found)
    playable = found.status == Status.ARCHIVED and bool(found.archive_key)
    if playable and found.archive_key:
        svc = services(current_app)
        # The player follows a redirect to a presigned link: its origin must be allowed.
        link = svc.storage.presigned_url(found.archive_key, found.archive_version_id, 1)
        if link is not None:
            g.console_media_origin = _origin(link)
    # The same transcript, text and all, as GET /api/recordings/<id>/transcript shows.
    transcript = find_transcript(request_session(), recording_id)
    return render_template(
        "console/recording.html",
        r=body,
        playable=playable,
        transcript=None if transcript is None else transcript_json(transcript),
        history=legal_hold_history(request_session(), recording_id),
        q=request.args.get("q"),
    )


@bp.get("/recordings/<recording_id>/audio")
@signed_in(Role.COMPLIANCE)
def audio(recording_id: str) -> ResponseReturnValue:
    """The archived bytes, through the same short-lived link or stream as the API's /audio."""
    return actions.audio_response(actions.get_recording(recording_id))


# --- admin: legal hold, failed recordings, audit log --------------------------------------------


@bp.post("/recordings/<recording_id>/legal-hold")
@signed_in(Role.ADMIN)
def legal_hold(recording_id: str) -> ResponseReturnValue:
    """Place or lift a legal hold, with a reason."""
    on = request.form.get("on")
    if on not in ("true", "false"):
        raise ConsoleError(400, "invalid_on", "Choose whether to place or lift the hold.")
    reason = request.form.get("reason", "").strip() or None
    actions.set_legal_hold(recording_id, on == "true", reason, g.staff_name)
    return redirect(url_for("console.recording", recording_id=recording_id), 303)


@bp.get("/failed")
@signed_in(Role.ADMIN)
def failed() -> ResponseReturnValue:
    """Recordings that could not be archived, with their error."""
    args = {"status": Status.FAILED.value}
    if request.args.get("cursor"):
        args["cursor"] = request.args["cursor"]
    recordings, next_cursor = recordings_page(request_session(), args)
    note_recordings(*(str(r["recording_id"]) for r in recordings))
    return render_template(
        "console/failed.html",
        recordings=recordings,
        next_url=_next_page("console.failed", {}, next_cursor),
    )


@bp.post("/recordings/<recording_id>/requeue")
@signed_in(Role.ADMIN)
def requeue(recording_id: str) -> ResponseReturnValue:
    """Put a failed recording back on the archive queue."""
    actions.requeue_recording(recording_id)
    return redirect(url_for("console.failed", requeued=recording_id), 303)


AUDIT_FIELDS = ("staff", "recording_id", "since", "until", "limit")


@bp.get("/audit")
@signed_in(Role.ADMIN)
def audit() -> ResponseReturnValue:
    """The access log, API and console alike, with its filters."""
    args = {
        name: request.args[name] for name in (*AUDIT_FIELDS, "cursor") if request.args.get(name)
    }
    events: list[dict[str, object]] = []
    next_cursor = None
    error = None
    try:
        events, next_cursor = audit_page(request_session(), args)
    except APIError as exc:
        error = exc.message
    return render_template(
        "console/audit.html",
        args=args,
        events=events,
        next_url=_next_page("console.audit", args, next_cursor),
        error=error,
    ), 400 if error else 200
