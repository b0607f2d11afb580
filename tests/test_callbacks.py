"""The recording callback: signature, validation, idempotent storage and queueing."""

from __future__ import annotations

from sqlalchemy import func, select

from tests.conftest import post_callback
from webhook import services
from webhook.models import CallbackLog, Recording, Status


def count(app, model) -> int:
    with services(app).sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_signed_callback_is_stored_and_queued(app, client, plivo):
    params = plivo.finish_recording("rec-1", b"audio", conference_name="Room 1")
    response = post_callback(client, plivo, params)
    assert response.status_code == 200, response.json
    assert response.json == {"status": "accepted", "recording_id": "rec-1"}
    with services(app).sessions() as session:
        recording = session.scalars(select(Recording)).one()
    assert recording.status == Status.PENDING
    assert recording.conference_name == "Room 1"
    assert count(app, CallbackLog) == 1
