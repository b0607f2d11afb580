"""/openapi.json describes the service truthfully: schemathesis finds no server error and no
response that contradicts the document."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import positive_data_acceptance

from tests.conftest import post_callback, post_transcription
from webhook.models import Role


@pytest.fixture
def api_schema(app: Flask, client: Any, plivo: Any) -> Any:
    """The served document, bound to an app holding a few recordings and a running conference."""
    plivo.add_conference("Room 1")
    # A member present for every recording, so participants with their times are checked too.
    assert post_callback(client, plivo, plivo.join("Room 1", "+14155550101", "+14155550100"))
    for n in range(3):
        params = plivo.finish_recording(f"rec-{n}", b"audio", conference_name="Room 1")
        assert post_callback(client, plivo, params).status_code == 200
    words = plivo.transcribe("rec-0", "Speaker 0: hello world, a guaranteed return")
    assert post_transcription(client, plivo, words).status_code == 200
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


def test_document_is_openapi_3_and_lists_every_route(app: Flask, client: Any) -> None:
    document = client.get("/openapi.json").json
    assert document["openapi"].startswith("3.")
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    documented = {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    served = {
        (rule.rule.replace("<path:name>", "{name}").replace("<recording_id>", "{recording_id}"), m)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        # The console's pages are HTML for a browser: only its entry point is in the document.
        and (not rule.endpoint.startswith("console.") or rule.endpoint == "console.search")
        for m in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert served == documented


def test_every_response_matches_the_document(api_schema: Any, auth: Any) -> None:
    headers = auth(Role.ADMIN)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 11

    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def conforms(case: Any) -> None:
            case.headers = {**(case.headers or {}), **headers}
            response = case.call()
            # Dates and cursors are checked beyond what JSON Schema can say (2023-02-30 has the
            # documented shape), so a 400 for such a value is right; every other check runs.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        conforms()
