"""Operators start and stop the recording of a live Plivo conference."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flask import Blueprint, Response, current_app, g, jsonify, request

from webhook import services
from webhook.audit import note_recordings
from webhook.auth import require
from webhook.db import request_session
from webhook.errors import APIError, BadParameter, PlivoError
from webhook.models import Role
from webhook.recordings import CONTROL_CHARACTERS, FILE_FORMATS, record_start, to_json

bp = Blueprint("conferences", __name__)

# Ask Plivo to retry the callback up to 5 times on any failure, not once on a timeout only.
CALLBACK_RETRY_FRAGMENT = "#rc=5&rp=all"


def _conference_name(name: str) -> str:
    if not 1 <= len(name) <= 255 or CONTROL_CHARACTERS.search(name):
        raise BadParameter(
            "conference_name", "conference name must be 1 to 255 characters, none of them control"
        )
    return name


@contextmanager
def conference_running(name: str) -> Iterator[None]:
    """Turn Plivo's 404 for a conference into our own `conference_not_found`."""
    try:
        yield
    except PlivoError as exc:
        if exc.status == 404:
            raise APIError(
                404, "conference_not_found", f"No conference named {name!r} is running"
            ) from None
        raise


@bp.post("/conferences/<path:name>/recording")
@require(Role.OPERATOR)
def start_recording(name: str) -> tuple[Response, int]:
    """Start recording a live conference and snapshot who is in it."""
    name = _conference_name(name)
    body = request.get_json(silent=True) if request.data else {}
    if not isinstance(body, dict):
        raise BadParameter("body", "the body must be a JSON object")
    file_format = body.get("file_format", "mp3")
    if file_format not in FILE_FORMATS:
        raise BadParameter("file_format", f"file_format must be one of {', '.join(FILE_FORMATS)}")
    svc = services(current_app)
    if not svc.settings.public_url:
        raise APIError(503, "public_url_not_set", "PUBLIC_URL must be set so Plivo can call back")
    plivo = svc.plivo
    # The members first: a conference that is not running fails here, before anything starts.
    with conference_running(name):
        conference = plivo.get_conference(name)
    started = plivo.start_recording(
        name, file_format, svc.settings.public_url + "/plivo/recording" + CALLBACK_RETRY_FRAGMENT
    )
    recording_id = started.get("recording_id")
    if not recording_id:
        raise APIError(502, "plivo_error", "Plivo did not answer with a recording_id")
    session = request_session()
    recording = record_start(
        session,
        recording_id=str(recording_id),
        conference_name=name,
        file_format=file_format,
        api_id=started.get("api_id"),
        record_url=started.get("url"),
        members=list(conference.get("members") or []),
        started_by=g.staff_name,
    )
    session.commit()
    note_recordings(recording.recording_id)
    return jsonify(to_json(recording)), 201


@bp.delete("/conferences/<path:name>/recording")
@require(Role.OPERATOR)
def stop_recording(name: str) -> Response:
    """Stop the conference's recordings; the callback then archives them."""
    name = _conference_name(name)
    with conference_running(name):
        services(current_app).plivo.stop_recording(name)
    return jsonify(conference_name=name, status="stopping")
