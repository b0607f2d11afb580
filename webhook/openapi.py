"""The OpenAPI 3 description of the service, served at /openapi.json."""

from __future__ import annotations

from functools import cache
from typing import Any

from webhook.edge import REQUEST_TARGET_LIMIT
from webhook.models import Status
from webhook.recordings import RECORDING_ID as RECORDING_ID_PATTERN
from webhook.search import MAX_LIMIT

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


STAFF_ERRORS = {
    "401": _error("No valid bearer token"),
    "403": _error("The token's role may not do this"),
    "414": _error(f"The path and query are longer than {REQUEST_TARGET_LIMIT} characters"),
    "503": _error("The database or the audit log is unavailable"),
}
RECORDING_ID = {
    "name": "recording_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "maxLength": 64, "pattern": RECORDING_ID_PATTERN.pattern},
}
CONFERENCE_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$",
    },
}
NULLABLE_STRING = {"type": ["string", "null"]}
TEXT = {"type": "string", "maxLength": 255}
STRING = {"type": "string"}
NULLABLE_INT = {"type": ["integer", "null"]}

FILTER_PARAMS = [
    _query("conference", "Exact conference name", TEXT),
    _query("conference_prefix", "Conference names starting with this", TEXT),
    _query(
        "participant",
        "From/to of a member present while the recording ran, formatting ignored "
        "(+1 (415) 555-0101 = 14155550101; sip: addresses)",
        TEXT,
    ),
    _query("since", "Recording start at or after (ISO-8601; UTC if no zone)", TEXT),
    _query("until", "Recording start before (ISO-8601; UTC if no zone)", TEXT),
    _query("status", "Archive state", {"type": "string", "enum": [s.value for s in Status]}),
    _query("min_duration", "Seconds, at least", {"type": "number", "minimum": 0, "maximum": 1e9}),
    _query("max_duration", "Seconds, at most", {"type": "number", "minimum": 0, "maximum": 1e9}),
    _query("legal_hold", "Under legal hold or not", {"type": "string", "enum": ["true", "false"]}),
    _query(
        "retained_until_after",
        "Object Lock retain-until at or after (ISO-8601; UTC if no zone)",
        TEXT,
    ),
    _query(
        "retained_until_before",
        "Object Lock retain-until before (ISO-8601; UTC if no zone)",
        TEXT,
    ),
    _query(
        "notified",
        "false: some participant was not told of the recording (no recording notice reached "
        "them); true: every participant was",
        {"type": "string", "enum": ["true", "false"]},
    ),
    _query(
        "q",
        'Transcript words: all of `word`s, `"a phrase"`, `OR` between alternatives, `-word` '
        "to exclude; exact words (no stemming), case-insensitive, accents kept. Hits carry a "
        "`snippet` with the matched words marked « ».",
        TEXT,
    ),
]
PAGE_PARAMS = [
    _query(
        "limit",
        f"Page size, 1 to {MAX_LIMIT} (default 50)",
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
    ),
    _query("cursor", "next_cursor from the previous page", TEXT),
]

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "A stable code, e.g. invalid_since"},
            "message": {"type": "string", "description": "A sentence for people"},
        },
    },
    "Participant": {
        "type": "object",
        "description": "A conference member present while the recording ran: its presence "
        "overlaps the recording's start and end, in the same run of the conference "
        "(ConferenceUUID) where known. from/to/caller_name/direction come from Retrieve "
        "Conference or, for members learnt from events, from Plivo's Call API (null until known).",
        "properties": {
            **{
                name: NULLABLE_STRING
                for name in (
                    "member_id",
                    "from",
                    "to",
                    "caller_name",
                    "direction",
                    "call_uuid",
                    "join_time",
                )
            },
            "joined_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "When the member joined the conference (null: not known)",
            },
            "left_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "When the member left (null: still there, or not known)",
            },
            "source": {
                "type": ["string", "null"],
                "enum": ["event", "snapshot", "poll", None],
                "description": "Where the join was learnt: a member event (Conference XML "
                "callbackUrl), the snapshot at the start of a recording through the API, or a "
                "re-read of the conference while it was recorded",
            },
            "notified_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "When the member was told the conference is recorded",
            },
        },
    },
    "Notice": {
        "type": "object",
        "description": "A recording notice spoken or played to a member (RECORDING_NOTICE_*)",
        "properties": {
            "member_id": STRING,
            "call_uuid": NULLABLE_STRING,
            "at": {"type": "string", "format": "date-time"},
            "outcome": {"type": "string", "enum": ["played", "failed"]},
            "error": NULLABLE_STRING,
        },
    },
    "Archive": {
        "type": ["object", "null"],
        "properties": {
            "key": STRING,
            "size": {"type": "integer"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "version_id": NULLABLE_STRING,
            "archived_at": {"type": "string", "format": "date-time"},
        },
    },
    "Recording": {
        "type": "object",
        "required": ["recording_id", "status", "start_ms", "attempts", "legal_hold"],
        "properties": {
            "recording_id": STRING,
            "conference_name": NULLABLE_STRING,
            "conference_uuid": {
                "type": ["string", "null"],
                "description": "Plivo's id of the conference's run (a name is reused, this not)",
            },
            "status": {"type": "string", "enum": [s.value for s in Status]},
            "file_format": NULLABLE_STRING,
            "duration_ms": NULLABLE_INT,
            "duration_s": NULLABLE_INT,
            "start_ms": {"type": "integer"},
            "end_ms": NULLABLE_INT,
            "api_id": NULLABLE_STRING,
            "record_url": NULLABLE_STRING,
            "started_by": NULLABLE_STRING,
            "participants": {"type": "array", "items": _ref("Participant")},
            "archive": _ref("Archive"),
            "attempts": {"type": "integer"},
            "next_attempt_at": NULLABLE_STRING,
            "last_error": NULLABLE_STRING,
            "retain_until": NULLABLE_STRING,
            "legal_hold": {"type": "boolean"},
            "legal_hold_reason": NULLABLE_STRING,
            "legal_hold_history": {
                "type": "array",
                "description": "Only in GET /api/recordings/{recording_id}",
                "items": {
                    "type": "object",
                    "properties": {
                        "on": {"type": "boolean"},
                        "reason": NULLABLE_STRING,
                        "staff": STRING,
                        "at": STRING,
                    },
                },
            },
            "created_at": NULLABLE_STRING,
            "updated_at": NULLABLE_STRING,
            "notices": {"type": "array", "items": _ref("Notice")},
            "plivo_deleted_at": {
                "type": ["string", "null"],
                "description": "When it was deleted from Plivo (DELETE_FROM_PLIVO_AFTER_DAYS)",
            },
            "archive_mismatch": {
                "type": ["string", "null"],
                "description": "Why the archived object did not match its SHA-256 when re-read "
                "before deletion from Plivo (it is then never deleted)",
            },
            "plivo_deletions": {
                "type": "array",
                "description": "Only in GET /api/recordings/{recording_id}: each deletion from "
                "Plivo done, failed, refused for now, or refused for a mismatch",
                "items": {
                    "type": "object",
                    "properties": {
                        "at": STRING,
                        "outcome": {
                            "type": "string",
                            "enum": ["deleted", "failed", "refused", "mismatch"],
                        },
                        "error": NULLABLE_STRING,
                    },
                },
            },
            "transcript": _ref("TranscriptSummary"),
            "snippet": {
                "type": ["string", "null"],
                "description": "Only with q: an extract of the transcript, matches marked « »",
            },
        },
    },
    "TranscriptSummary": {
        "type": ["object", "null"],
        "description": "null when the recording has no transcript",
        "properties": {
            "status": {"type": "string", "enum": ["received", "error", "ordered"]},
            "sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
            "chars": NULLABLE_INT,
            "error": NULLABLE_STRING,
            "archived_at": NULLABLE_STRING,
        },
    },
    "Transcript": {
        "type": "object",
        "required": ["recording_id", "status", "text", "sha256", "error"],
        "properties": {
            "recording_id": STRING,
            "status": {"type": "string", "enum": ["received", "error", "ordered"]},
            "text": {
                "type": ["string", "null"],
                "description": "Exactly as Plivo sent it (Speaker N: labels and line breaks)",
            },
            "chars": NULLABLE_INT,
            "sha256": {
                "type": ["string", "null"],
                "description": "SHA-256 of the JSON document archived beside the audio",
            },
            "error": {
                "type": ["string", "null"],
                "description": "Plivo's reason for not transcribing (too long, too big, …)",
            },
            "source": {"type": ["string", "null"], "enum": ["callback", "api", None]},
            "received_at": NULLABLE_STRING,
            "plivo": {"type": "object", "additionalProperties": STRING},
            "archive": _ref("Archive"),
            "archive_error": NULLABLE_STRING,
        },
    },
    "RecordingPage": {
        "type": "object",
        "required": ["recordings", "next_cursor"],
        "properties": {
            "recordings": {"type": "array", "items": _ref("Recording")},
            "next_cursor": NULLABLE_STRING,
        },
    },
    "AuditEvent": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "at": {"type": "string", "format": "date-time"},
            "staff": NULLABLE_STRING,
            "role": NULLABLE_STRING,
            "method": STRING,
            "path": STRING,
            "query": {"type": "string", "description": "The raw query string, in full"},
            "params": {
                "type": ["object", "null"],
                "description": "The decoded query parameters as the service read them, in full "
                "(a filter uses the first value of a repeated parameter)",
                "additionalProperties": {"type": "array", "items": STRING},
            },
            "status": {"type": "integer"},
            "recording_ids": {"type": "array", "items": STRING},
            "remote_addr": NULLABLE_STRING,
            "user_agent": NULLABLE_STRING,
            "request_id": NULLABLE_STRING,
        },
    },
    "AuditPage": {
        "type": "object",
        "required": ["events", "next_cursor"],
        "properties": {
            "events": {"type": "array", "items": _ref("AuditEvent")},
            "next_cursor": NULLABLE_STRING,
        },
    },
    "CallbackAnswer": {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["accepted", "duplicate", "ignored"]},
            "conference_action": {"type": "string"},
            "recording_id": STRING,
        },
    },
    "Health": {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "checks": {
                "type": "object",
                "description": "ok or unavailable per check (database, migrated to the newest "
                "revision; archive; callbacks, configured); why a check failed is logged",
                "additionalProperties": {"type": "string", "enum": ["ok", "unavailable"]},
            },
            "details": {
                "type": "object",
                "description": "Why each failed check failed: only for an operator or admin "
                "token, and only while the database answers",
                "additionalProperties": STRING,
            },
        },
    },
}

CALLBACK_FIELDS = {
    "type": "object",
    "description": "A recording's callback needs recording_id and record_url (RecordingID and "
    "RecordUrl in CamelCase); a member event needs ConferenceAction (enter or exit), "
    "ConferenceName, ConferenceMemberID, and CallUUID or ConferenceUUID.",
    "properties": {
        "ConferenceAction": STRING,
        "ConferenceName": STRING,
        "ConferenceUUID": STRING,
        "ConferenceMemberID": STRING,
        "CallUUID": STRING,
        "api_id": STRING,
        "record_url": STRING,
        "recording_id": STRING,
        "conference_name": STRING,
        "recording_duration": STRING,
        "recording_duration_ms": STRING,
        "recording_start_ms": STRING,
        "recording_end_ms": STRING,
    },
}


TRANSCRIPTION_FIELDS = {
    "type": "object",
    "required": ["recording_id"],
    "properties": {
        "transcription": STRING,
        "recording_id": STRING,
        "call_uuid": STRING,
        "duration": STRING,
        "transcription_charge": STRING,
        "transcription_rate": STRING,
        "error": STRING,
    },
}


def _callback_operation(
    method: str, kind: str = "recording", fields: dict[str, Any] = CALLBACK_FIELDS
) -> dict[str, Any]:
    naming = (
        "Field names in snake_case (Record API) or CamelCase (Conference XML). A Conference XML "
        "callbackUrl also receives member events: enter and exit are stored once each "
        "(accepted, then duplicate for Plivo's retries); digits, floor and the like are "
        "acknowledged as ignored."
        if kind == "recording"
        else "Stored once per recording, whether before or after the recording's callback; "
        "`transcription` or `error` is required."
    )
    operation: dict[str, Any] = {
        "tags": ["plivo"],
        "summary": f"Plivo's {kind} callback ({method})",
        "description": "Signed with X-Plivo-Signature-V3 (or -Ma-V3) over PUBLIC_URL + path. "
        + naming,
        "security": [],
        "parameters": [
            {"name": "X-Plivo-Signature-V3", "in": "header", "schema": TEXT},
            {"name": "X-Plivo-Signature-Ma-V3", "in": "header", "schema": TEXT},
            {"name": "X-Plivo-Signature-V3-Nonce", "in": "header", "schema": TEXT},
        ],
        "responses": {
            "200": _json(
                "Accepted, or a duplicate of an accepted callback", _ref("CallbackAnswer")
            ),
            "400": _error("A field is missing or malformed; the code names it"),
            "403": _error("Missing, wrong or replayed signature"),
            "413": _error("Body too large"),
            "503": _error("Database unavailable or callbacks not configured; Plivo should retry"),
        },
    }
    if method == "POST":
        operation["requestBody"] = {
            "required": True,
            "content": {"application/x-www-form-urlencoded": {"schema": fields}},
        }
    return operation


@cache
def openapi_document() -> dict[str, Any]:
    """The whole document (built once per process)."""
    recording = {
        "200": _json("The recording", _ref("Recording")),
        "400": _error("A malformed recording_id or parameter; the code names it"),
        "404": _error("No such recording"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Plivo conference recording archive",
            "version": "1",
            "description": "Starts Plivo conference recordings, archives them byte-exact with a "
            "SHA-256, and lets compliance staff search, play and audit them.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
        },
        "security": [{"bearer": []}],
        "paths": {
            "/plivo/recording": {
                "post": _callback_operation("POST"),
                "get": _callback_operation("GET"),
            },
            "/plivo/transcription": {
                "post": _callback_operation("POST", "transcription", TRANSCRIPTION_FIELDS),
                "get": _callback_operation("GET", "transcription", TRANSCRIPTION_FIELDS),
            },
            "/api/conferences/{name}/recording": {
                "parameters": [CONFERENCE_NAME],
                "post": {
                    "tags": ["operators"],
                    "summary": "Start recording a live conference (operator)",
                    "requestBody": {
                        "required": False,
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "file_format": {"type": "string", "enum": ["mp3", "wav"]}
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "201": _json("Recording started", _ref("Recording")),
                        "400": _error("Bad file_format or Plivo rejected the request"),
                        "404": _error("The conference is not running"),
                        "409": _error("The conference is being recorded already"),
                        "502": _error("Plivo failed or refused the credentials"),
                        "504": _error("Plivo did not answer in time"),
                        **STAFF_ERRORS,
                    },
                },
                "delete": {
                    "tags": ["operators"],
                    "summary": "Stop recording a conference (operator)",
                    "responses": {
                        "200": _json("Stopping", {"type": "object"}),
                        "400": _error("A malformed conference name or parameter"),
                        "404": _error("No such conference"),
                        "502": _error("Plivo failed"),
                        "504": _error("Plivo did not answer in time"),
                        **STAFF_ERRORS,
                    },
                },
            },
            "/api/recordings": {
                "get": {
                    "tags": ["compliance"],
                    "summary": "Search recordings, newest first (compliance)",
                    "parameters": FILTER_PARAMS + PAGE_PARAMS,
                    "responses": {
                        "200": _json("A page of recordings", _ref("RecordingPage")),
                        "400": _error("A parameter is malformed; the code names it"),
                        **STAFF_ERRORS,
                    },
                }
            },
            "/api/recordings/export": {
                "get": {
                    "tags": ["compliance"],
                    "summary": "Stream every matching recording as CSV or NDJSON (compliance)",
                    "parameters": [
                        *FILTER_PARAMS,
                        _query(
                            "format",
                            "csv or ndjson (default)",
                            {"type": "string", "enum": ["csv", "ndjson"]},
                        ),
                    ],
                    "responses": {
                        "200": {
                            "description": "The rows, streamed; in CSV a text cell starting "
                            "with = + - @ tab or CR is prefixed with ' so spreadsheets show it "
                            "as text (NDJSON is exact)",
                            "content": {
                                "text/csv": {"schema": STRING},
                                "application/x-ndjson": {"schema": STRING},
                            },
                        },
                        "400": _error("A parameter is malformed; the code names it"),
                        **STAFF_ERRORS,
                    },
                }
            },
            "/api/recordings/{recording_id}": {
                "parameters": [RECORDING_ID],
                "get": {
                    "tags": ["compliance"],
                    "summary": "One recording with participants and archive (compliance)",
                    "responses": {**recording, **STAFF_ERRORS},
                },
            },
            "/api/recordings/{recording_id}/audio": {
                "parameters": [RECORDING_ID],
                "get": {
                    "tags": ["compliance"],
                    "summary": "Play or download the audio (compliance)",
                    "responses": {
                        "200": {
                            "description": "The audio bytes (local archive)",
                            "content": {"audio/mpeg": {}, "audio/wav": {}},
                        },
                        "302": {
                            "description": "Redirect to a presigned S3 URL (5 minutes at most)"
                        },
                        "400": _error("A malformed recording_id or parameter; the code names it"),
                        "404": _error("No such recording"),
                        "409": _error("Not archived yet"),
                        **STAFF_ERRORS,
                    },
                },
            },
            "/api/recordings/{recording_id}/transcript": {
                "parameters": [RECORDING_ID],
                "get": {
                    "tags": ["compliance"],
                    "summary": "A recording's transcript, its SHA-256 and archive (compliance)",
                    "responses": {
                        "200": _json("The transcript", _ref("Transcript")),
                        "404": _error("No transcript of this recording"),
                        **STAFF_ERRORS,
                    },
                },
            },
            "/api/recordings/{recording_id}/legal-hold": {
                "parameters": [RECORDING_ID],
                "put": {
                    "tags": ["admin"],
                    "summary": "Place or lift an S3 Object Lock legal hold on the audio and its "
                    "transcript (admin)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["on"],
                                    "properties": {
                                        "on": {"type": "boolean"},
                                        "reason": {"type": "string", "maxLength": 2000},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        **recording,
                        "400": _error(
                            "Malformed body or recording_id, a reason holding control "
                            "characters, or no reason for a hold; nothing was changed"
                        ),
                        "409": _error("Not archived yet"),
                        "502": _error("S3 did not confirm the hold; nothing was changed"),
                        **STAFF_ERRORS,
                    },
                },
            },
            "/api/audit": {
                "get": {
                    "tags": ["admin"],
                    "summary": "The access log, newest first (admin)",
                    "parameters": [
                        _query("staff", "Staff name", TEXT),
                        _query(
                            "recording_id",
                            "Requests that showed or touched this recording",
                            TEXT,
                        ),
                        _query("since", "At or after (ISO-8601)", TEXT),
                        _query("until", "Before (ISO-8601)", TEXT),
                        *PAGE_PARAMS,
                    ],
                    "responses": {
                        "200": _json("A page of events", _ref("AuditPage")),
                        "400": _error("A parameter is malformed; the code names it"),
                        **STAFF_ERRORS,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "tags": ["meta"],
                    "summary": "Whether the database (migrated to head) and the archive answer "
                    "and callbacks are configured",
                    "security": [],
                    "responses": {
                        "200": _json("Healthy", _ref("Health")),
                        "503": _json("Unhealthy", _ref("Health")),
                    },
                }
            },
            "/console/": {
                "get": {
                    "tags": ["console"],
                    "summary": "The staff console (HTML pages for a browser; see the README)",
                    "description": "Signed in through a form that takes a staff token, then a "
                    "session cookie. Its other pages live under /console/ too; they are HTML, "
                    "not part of the JSON API.",
                    "security": [],
                    "responses": {
                        "200": {"description": "The search page", "content": {"text/html": {}}},
                        "302": {"description": "Not signed in: to /console/sign-in"},
                        "503": {"description": "The access could not be audited"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "tags": ["meta"],
                    "summary": "Prometheus metrics (recordings by state, archive lag, attempts, "
                    "callbacks by outcome and reason, archive duration and bytes)",
                    "description": "Needs `Authorization: Bearer $METRICS_TOKEN`; 404 when "
                    "METRICS_TOKEN is not set.",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "401": _error("No METRICS_TOKEN bearer token"),
                        "404": _error("Metrics are off (no METRICS_TOKEN)"),
                        "503": _error("The database is unavailable"),
                    },
                }
            },
            "/test-audio/{recording_id}.wav": {
                "get": {
                    "tags": ["meta"],
                    "summary": "The audio of `webhook send-test-callback`'s test recordings "
                    "(one second of silence)",
                    "security": [],
                    "parameters": [
                        {
                            "name": "recording_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "maxLength": 64},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "A WAV file",
                            "content": {"audio/wav": {"schema": {"type": "string"}}},
                        },
                        "404": _error("Not a test recording's name"),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "tags": ["meta"],
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
                }
            },
        },
    }
