"""Operators start and stop the recording of a live Plivo conference."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, g, jsonify, request

from webhook import services
from webhook.audit import note_recordings
from webhook.auth import require
from webhook.conferences import conference_running, start_recording
from webhook.db import request_session
from webhook.errors import BadParameter
from webhook.models import Role
from webhook.recordings import CONTROL_CHARACTERS, FILE_FORMATS, find, to_json

bp = Blueprint("conferences", __name__)


def _conference_name(name: str) -> str:
    if not 1 <= len(name) <= 255 or CONTROL_CHARACTERS.search(name):
        raise BadParameter(
            "conference_name", "conference name must be 1 to 255 characters, none of them control"
        )
    return name


@bp.post("/conferences/<path:name>/recording")
@require(Role.OPERATOR)
def start(name: str) -> tuple[Response, int]:
    """Start recording a live conference, snapshot who is in it and tell them (409 if it is
    being recorded already)."""
    name = _conference_name(name)
    body = request.get_json(silent=True) if request.data else {}
    if not isinstance(body, dict):
        raise BadParameter("body", "the body must be a JSON object")
    file_format = body.get("file_format", "mp3")
    if file_format not in FILE_FORMATS:
        raise BadParameter("file_format", f"file_format must be one of {', '.join(FILE_FORMATS)}")
    recording_id = start_recording(services(current_app), name, file_format, g.staff_name)
    note_recordings(recording_id)
    recording = find(request_session(), recording_id)
    assert recording is not None  # stored and committed by start_recording
    return jsonify(to_json(recording)), 201


@bp.delete("/conferences/<path:name>/recording")
@require(Role.OPERATOR)
def stop_recording(name: str) -> Response:
    """Stop the conference's recordings; the callback then archives them."""
    name = _conference_name(name)
    with conference_running(name):
        services(current_app).plivo.stop_recording(name)
    return jsonify(conference_name=name, status="stopping")
