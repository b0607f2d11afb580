"""A fake Plivo for tests: REST API, media host and signed callbacks, over HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import hmac
import json
import operator
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import requests
from plivo.utils.signature_v3 import construct_get_url, construct_post_url, get_signature_v3
from werkzeug.serving import BaseWSGIServer, ThreadedWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

DEFAULT_AUTH_ID = "MAFAKEAUTHID"
DEFAULT_AUTH_TOKEN = "fake-auth-token"
SIGNATURE_HEADER = "X-Plivo-Signature-V3"
NONCE_HEADER = "X-Plivo-Signature-V3-Nonce"
PAGE_LIMIT_MAX = 20
# Plivo's Recording list: the last 7 days without an add_time filter, at most 30 days with one.
DEFAULT_LIST_WINDOW = timedelta(days=7)
MAX_LIST_WINDOW = timedelta(days=30)
MEDIA_CHUNK_BYTES = 64 * 1024
MEDIA_CONTENT_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav"}
# Plivo waits 2 s to connect and 40 s to read when it delivers a callback.
CALLBACK_TIMEOUT = (2.0, 40.0)
# Fields of a recording that Plivo's Recording API shows; the rest of the dict is the fake's own.
RECORDING_API_FIELDS = (
    "recording_id",
    "conference_name",
    "call_uuid",
    "recording_format",
    "recording_type",
    "recording_url",
    "add_time",
    "recording_duration_ms",
    "recording_start_ms",
    "recording_end_ms",
    "resource_uri",
)
ADD_TIME_FILTERS: dict[str, Callable[[datetime, datetime], bool]] = {
    "add_time__gt": operator.gt,
    "add_time__gte": operator.ge,
    "add_time__lt": operator.lt,
    "add_time__lte": operator.le,
}

CallbackParams = Mapping[str, str | Sequence[str]]
CallRecord = tuple[str, str, dict[str, Any]]


class _QuietRequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler without an access-log line per request."""

    # A client that connects and sends nothing must not keep stop() waiting for ever.
    timeout = 10

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Say nothing about successful requests."""


class FakePlivo:
    """A local stand-in for Plivo: the REST calls the service makes, media, signed callbacks."""

    def __init__(
        self, auth_id: str = DEFAULT_AUTH_ID, auth_token: str = DEFAULT_AUTH_TOKEN
    ) -> None:
        self.auth_id = auth_id
        self.auth_token = auth_token
        self.url = ""
        self.calls: list[CallRecord] = []
        self.call_headers: list[dict[str, str]] = []
        self.recordings: dict[str, dict[str, Any]] = {}
        self.media: dict[str, bytes] = {}
        self.media_requests: list[tuple[str, bool]] = []
        self.media_faults: dict[str, list[str]] = {}
        self.api_faults: list[int | str] = []
        self.api_fault_body: dict[str, Any] | None = None  # the JSON an injected fault answers
        self.stall_seconds = 5.0
        self.conferences: dict[str, dict[str, Any]] = {}
        # Speak and Play requests that reached a live conference's members, and faults to answer
        # the next ones with (status codes, in order).
        self.notices: list[dict[str, Any]] = []
        self.notice_faults: list[int] = []
        self.deleted_recordings: list[str] = []
        self.delete_faults: list[int] = []
        # Transcripts Plivo has made (GET Transcription) and the ones it was asked for (POST).
        self.transcriptions: dict[str, dict[str, Any]] = {}
        self.transcription_orders: list[tuple[str, dict[str, Any]]] = []
        self._conference_uuids: dict[str, str] = {}
        # Calls by UUID, as the Call API shows them: live while up, a record once ended.
        self.phone_calls: dict[str, dict[str, Any]] = {}
        self._member_counters: dict[str, int] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakePlivo:
        """Serve on a free port of 127.0.0.1 in a background thread; `url` is set on return."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = make_server(
            "127.0.0.1", 0, self._wsgi_app, threaded=True, request_handler=_QuietRequestHandler
        )
        # Non-daemon handler threads are joined by server_close(), so stop() leaves nothing running.
        if isinstance(server, ThreadedWSGIServer):
            server.daemon_threads = False
        self._server = server
        self.url = f"http://127.0.0.1:{server.port}"
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fakeplivo-{server.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Wake stalled answers, stop serving and wait for every request thread to end."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()  # serve_forever() then calls server_close(), which joins the handlers
        thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> FakePlivo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- state the tests arrange ------------------------------------------------------------------

    def add_conference(
        self, name: str, members: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """Start a conference (two members by default); returns its members as Plivo shows them."""
        if members is None:
            members = [
                {
                    "member_id": "1",
                    "from": "+14155550101",
                    "to": "+14155550100",
                    "caller_name": "Alice",
                    "direction": "inbound",
                },
                {
                    "member_id": "2",
                    "from": "+14155550100",
                    "to": "+14155550102",
                    "caller_name": "",
                    "direction": "outbound",
                },
            ]
        completed = []
        for position, member in enumerate(members, start=1):
            completed.append(
                {
                    "member_id": str(position),
                    "muted": False,
                    "deaf": False,
                    "from": "",
                    "to": "",
                    "caller_name": "",
                    "direction": "inbound",
                    "call_uuid": str(uuid.uuid4()),
                    "join_time": "0",
                    **member,
                }
            )
        with self._lock:
            self.conferences[name] = {"members": completed, "started_at": time.time()}
            self._conference_uuids.setdefault(name, str(uuid.uuid4()))
        return [dict(member) for member in completed]

    def end_conference(self, name: str) -> None:
        """End a conference: it stops answering, and its recordings in progress stop."""
        with self._lock:
            self.conferences.pop(name, None)
            for recording in self.recordings.values():
                if recording["conference_name"] == name and recording["state"] == "recording":
                    recording["state"] = "stopped"

    # --- Conference XML: callers enter and leave, the Call API knows them ------------------------

    def new_conference_run(self, name: str) -> str:
        """The conference's name used again (another day): a new run with a new ConferenceUUID."""
        with self._lock:
            self._conference_uuids[name] = str(uuid.uuid4())
            self._member_counters.pop(name, None)
            return self._conference_uuids[name]

    def conference_uuid(self, name: str) -> str:
        with self._lock:
            return self._conference_uuids.setdefault(name, str(uuid.uuid4()))

    def add_call(
        self,
        from_number: str,
        to_number: str,
        caller_name: str = "",
        direction: str = "inbound",
        call_uuid: str | None = None,
    ) -> str:
        """A call that is up now; the Call API shows it live until `end_call`."""
        call_uuid = call_uuid or str(uuid.uuid4())
        with self._lock:
            self.phone_calls[call_uuid] = {
                "call_uuid": call_uuid,
                "from": from_number,
                "to": to_number,
                "caller_name": caller_name,
                "direction": direction,
                "live": True,
                "initiation_time": _plivo_time(datetime.now(UTC)),
            }
        return call_uuid

    def end_call(self, call_uuid: str) -> None:
        with self._lock:
            self.phone_calls[call_uuid]["live"] = False
            self.phone_calls[call_uuid]["end_time"] = _plivo_time(datetime.now(UTC))

    def join(
        self,
        name: str,
        from_number: str,
        to_number: str,
        caller_name: str = "",
        direction: str = "inbound",
    ) -> dict[str, str]:
        """A caller enters a conference made with Conference XML (started if it is not running):
        it becomes a member, its call is live; returns the `enter` event Plivo sends."""
        call_uuid = self.add_call(from_number, to_number, caller_name, direction)
        with self._lock:
            conference = self.conferences.setdefault(
                name, {"members": [], "started_at": time.time()}
            )
            present = [int(m["member_id"]) for m in conference["members"]]
            self._member_counters[name] = max([self._member_counters.get(name, 0), *present]) + 1
            member_id = str(self._member_counters[name])
            conference["members"].append(
                {
                    "member_id": member_id,
                    "muted": False,
                    "deaf": False,
                    "from": from_number,
                    "to": to_number,
                    "caller_name": caller_name,
                    "direction": direction,
                    "call_uuid": call_uuid,
                    "join_time": "0",
                }
            )
        return self.member_event("enter", name, member_id, call_uuid)

    def leave(self, name: str, member_id: str) -> dict[str, str]:
        """A member hangs up: gone from the conference, its call ended; returns the `exit` event."""
        with self._lock:
            members = self.conferences[name]["members"]
            [member] = [m for m in members if m["member_id"] == member_id]
            members.remove(member)
        self.end_call(member["call_uuid"])
        return self.member_event("exit", name, member_id, member["call_uuid"])

    def member_event(
        self, action: str, name: str, member_id: str, call_uuid: str
    ) -> dict[str, str]:
        """A member event's params as a Conference XML callbackUrl receives them."""
        return {
            "ConferenceAction": action,
            "ConferenceName": name,
            "ConferenceUUID": self.conference_uuid(name),
            "ConferenceMemberID": member_id,
            "CallUUID": call_uuid,
        }

    def media_url(self, recording_id: str, fmt: str = "mp3") -> str:
        """Where the fake serves a recording's audio (Plivo's `record_url`)."""
        return f"{self.url}/media/{recording_id}.{fmt}"

    def finish_recording(
        self,
        recording_id: str,
        content: bytes,
        duration_ms: int | None = None,
        scheme: str = "snake",
        conference_name: str | None = None,
        added_at: datetime | None = None,
    ) -> dict[str, str]:
        """Finish a recording (media, durations, times); return the callback params Plivo sends.

        `scheme` is "snake" (the Record API's callback) or "camel" (Conference XML's callbackUrl).
        A recording never started through the API is created, in `conference_name`. `added_at`
        puts it in the past (Plivo's `add_time`, and the end of the recording). Without
        `duration_ms`, the duration is 5 s, or as long as `content` lasts at 128 kbit/s if longer.
        """
        if duration_ms is None:
            duration_ms = max(5000, len(content) // 16)
        if scheme not in ("snake", "camel"):
            raise ValueError(f"unknown callback scheme {scheme!r}: use 'snake' or 'camel'")
        added = added_at or datetime.now(UTC)
        end_ms = int(added.timestamp() * 1000)
        start_ms = end_ms - duration_ms
        with self._lock:
            recording = self.recordings.get(recording_id)
            if recording is None:
                recording = self._new_recording(
                    recording_id, conference_name or "fake-conference", "mp3", None, "POST"
                )
            recording.update(
                state="finished",
                add_time=_plivo_time(added),
                recording_duration_ms=_plivo_ms(duration_ms),
                recording_start_ms=_plivo_ms(start_ms),
                recording_end_ms=_plivo_ms(end_ms),
            )
            self.media[recording_id] = bytes(content)
            name = recording["conference_name"]
            conference_uuid = self._conference_uuids.setdefault(name, str(uuid.uuid4()))
            record_url = recording["recording_url"]
        duration_s = str(round(duration_ms / 1000))
        if scheme == "camel":
            return {
                "RecordUrl": record_url,
                "RecordingID": recording_id,
                "ConferenceName": name,
                "ConferenceUUID": conference_uuid,
                "ConferenceAction": "record",
                "RecordingDuration": duration_s,
                "RecordingDurationMs": _plivo_ms(duration_ms),
                "RecordingStartMs": _plivo_ms(start_ms),
                "RecordingEndMs": _plivo_ms(end_ms),
            }
        return {
            "api_id": str(uuid.uuid4()),
            "record_url": record_url,
            "recording_id": recording_id,
            "conference_name": name,
            "recording_duration": duration_s,
            "recording_duration_ms": _plivo_ms(duration_ms),
            "recording_start_ms": _plivo_ms(start_ms),
            "recording_end_ms": _plivo_ms(end_ms),
        }

    def transcribe(
        self,
        recording_id: str,
        text: str | None,
        error: str | None = None,
        duration_s: int = 5,
    ) -> dict[str, str]:
        """Plivo's transcript of a recording, kept for GET Transcription; returns the fields of
        the transcription callback Plivo sends to `transcription_url` (with `error` when it
        could not transcribe)."""
        with self._lock:
            recording = self.recordings.get(recording_id, {})
            self.transcriptions[recording_id] = {
                "api_id": _api_id(),
                "status": "error" if error else "completed",
                "transcription": text or "",
                "recording_duration_ms": _plivo_ms(duration_s * 1000),
                "recording_start_ms": recording.get("recording_start_ms") or _plivo_ms(0),
                "cost": "0.05",
                "rate": "0.05",
                "error": error,
            }
        params = {
            "transcription": text or "",
            "recording_id": recording_id,
            "call_uuid": str(uuid.uuid4()),
            "duration": str(duration_s),
            "transcription_charge": "0.05",
            "transcription_rate": "0.05",
        }
        if error:
            params["error"] = error
        return params

    # --- callbacks, signed as Plivo signs them ----------------------------------------------------

    def sign_request(
        self,
        method: str,
        url: str,
        params: CallbackParams,
        nonce: str | None = None,
        auth_token: str | None = None,
    ) -> dict[str, str]:
        """The V3 signature headers for a callback, computed by the official SDK's own functions."""
        nonce = _fresh_nonce() if nonce is None else nonce
        token = self.auth_token if auth_token is None else auth_token
        # The SDK mutates the dict on GET and only treats `list` as several values: give it a copy.
        sdk_params: dict[str, Any] = {
            key: list(value) if isinstance(value, list | tuple) else value
            for key, value in params.items()
        }
        if method.upper() == "GET":
            base_url = construct_get_url(url, sdk_params)
        else:
            base_url = construct_post_url(url, sdk_params)
        # Same arguments as validate_v3_signature() passes: token and nonce as bytes, base as str.
        signature = get_signature_v3(
            token.encode("utf-8"), bytes(base_url).decode("utf-8"), nonce.encode("utf-8")
        )
        return {SIGNATURE_HEADER: signature.decode("ascii"), NONCE_HEADER: nonce}

    def send_callback(
        self,
        url: str,
        params: CallbackParams,
        method: str = "POST",
        nonce: str | None = None,
        auth_token: str | None = None,
        sign_url: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """Deliver a signed callback as Plivo does: a form body on POST, a query string on GET.

        The signature is over `sign_url or url`, so a test can connect to http://127.0.0.1:port
        while signing the public https URL the service is configured with.
        """
        headers = self.sign_request(method, sign_url or url, params, nonce, auth_token)
        headers.update(extra_headers or {})
        pairs = [
            (key, item)
            for key, value in params.items()
            for item in (value if isinstance(value, list | tuple) else [value])
        ]
        with requests.Session() as session:
            if method.upper() == "GET":
                return session.get(
                    url,
                    params=pairs,
                    headers=headers,
                    timeout=CALLBACK_TIMEOUT,
                    allow_redirects=False,
                )
            return session.request(
                method.upper(),
                url,
                data=pairs,
                headers=headers,
                timeout=CALLBACK_TIMEOUT,
                allow_redirects=False,
            )

    # --- the HTTP side ----------------------------------------------------------------------------

    def _wsgi_app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        # Route on the raw path so that a %2F inside a conference name stays inside its segment.
        raw_path = urlsplit(environ.get("RAW_URI") or request.path).path
        segments = [unquote(segment) for segment in raw_path.strip("/").split("/")]
        if len(segments) == 2 and segments[0] == "media":
            response = self._serve_media(request, segments[1])
        elif len(segments) >= 3 and segments[:2] == ["v1", "Account"]:
            response = self._serve_rest(request, segments[2], segments[3:])
        else:
            response = _error(404, "not found")
        return response(environ, start_response)

    def _serve_rest(self, request: Request, auth_id: str, resource: list[str]) -> Response:
        with self._lock:
            self.calls.append((request.method, request.path, _request_payload(request)))
            self.call_headers.append(dict(request.headers.items()))
            fault = self.api_faults.pop(0) if self.api_faults else None
        if fault == "stall":
            self._stopping.wait(self.stall_seconds)
        elif fault is not None and fault != "pass" and self.api_fault_body is not None:
            return _json(int(fault), self.api_fault_body)
        elif fault is not None and fault != "pass":  # "pass": this request goes through
            return _error(int(fault), f"injected fault {fault}")
        if not self._authorized(request, auth_id):
            return _error(401, "Authentication credentials invalid")
        method = request.method
        match resource:
            case ["Conference"] if method == "GET":
                with self._lock:
                    return _json(200, {"api_id": _api_id(), "conferences": list(self.conferences)})
            case ["Conference", name] if method == "GET":
                return self._get_conference(name)
            case ["Conference", name] if method == "DELETE":
                with self._lock:
                    if name not in self.conferences:
                        return _error(404, "not found")
                self.end_conference(name)
                return Response(status=204)
            case ["Conference", name, "Record"] if method == "POST":
                return self._start_recording(request, name)
            case ["Conference", name, "Record"] if method == "DELETE":
                return self._stop_recording(name)
            case ["Conference", name, "Member", member_ids, ("Speak" | "Play") as kind] if (
                method == "POST"
            ):
                return self._notice(request, name, member_ids, kind)
            case ["Recording", recording_id] if method == "DELETE":
                return self._delete_recording(recording_id)
            case ["Recording"] if method == "GET":
                return self._list_recordings(request, auth_id)
            case ["Recording", recording_id] if method == "GET":
                with self._lock:
                    recording = self.recordings.get(recording_id)
                    if recording is None or recording["state"] != "finished":
                        return _error(404, "not found")
                    return _json(200, {"api_id": _api_id(), **_recording_view(recording)})
            case ["Transcription", recording_id] if method == "GET":
                with self._lock:
                    transcript = self.transcriptions.get(recording_id)
                    if transcript is None:
                        return _error(404, "transcription not found")
                    return _json(200, dict(transcript))
            case ["Transcription", recording_id] if method == "POST":
                with self._lock:
                    recording = self.recordings.get(recording_id)
                    if recording is None or recording["state"] != "finished":
                        return _error(404, "recording not found")
                    self.transcription_orders.append((recording_id, _request_payload(request)))
                return _json(202, {"api_id": _api_id(), "message": "transcription in progress"})
            case ["Call", call_uuid] if method == "GET":
                return self._get_call(call_uuid, live=request.args.get("status") == "live")
            case ["Conference", *_] | ["Recording", *_] | ["Transcription", *_]:
                return _error(405, f"method {method} not allowed here")
        return _error(404, "not found")

    def _authorized(self, request: Request, auth_id: str) -> bool:
        credentials = request.authorization
        if credentials is None or credentials.type != "basic":
            return False
        expected = f"{self.auth_id}:{self.auth_token}".encode()
        given = f"{credentials.username}:{credentials.password}".encode()
        return hmac.compare_digest(given, expected) and auth_id == self.auth_id

    def _get_conference(self, name: str) -> Response:
        with self._lock:
            conference = self.conferences.get(name)
            if conference is None:
                return _error(404, "not found")
            members = [dict(member) for member in conference["members"]]
            run_time = int(time.time() - conference["started_at"])
        return _json(
            200,
            {
                "api_id": _api_id(),
                "conference_name": name,
                "conference_run_time": str(run_time),
                "conference_member_count": str(len(members)),
                "members": members,
            },
        )

    def _get_call(self, call_uuid: str, live: bool) -> Response:
        with self._lock:
            call = self.phone_calls.get(call_uuid)
            if call is None or call["live"] != live:
                return _error(404, "call not found")
            if live:
                return _json(
                    200,
                    {
                        "api_id": _api_id(),
                        "call_uuid": call_uuid,
                        "call_status": "in-progress",
                        **{k: call[k] for k in ("from", "to", "caller_name", "direction")},
                    },
                )
            return _json(
                200,
                {
                    "api_id": _api_id(),
                    "call_uuid": call_uuid,
                    "from_number": call["from"],
                    "to_number": call["to"],
                    "call_direction": call["direction"],
                    "initiation_time": call["initiation_time"],
                    "end_time": call["end_time"],
                },
            )

    def _start_recording(self, request: Request, name: str) -> Response:
        body = _request_payload(request)
        file_format = str(body.get("file_format") or "mp3")
        callback_method = str(body.get("callback_method") or "POST").upper()
        if file_format not in MEDIA_CONTENT_TYPES:
            return _error(400, "file_format must be mp3 or wav")
        if callback_method not in ("GET", "POST"):
            return _error(400, "callback_method must be GET or POST")
        recording_id = str(uuid.uuid4())
        with self._lock:
            if name not in self.conferences:
                return _error(404, "not found")
            recording = self._new_recording(
                recording_id, name, file_format, body.get("callback_url"), callback_method
            )
            url = recording["recording_url"]
        return _json(
            202,
            {
                "api_id": _api_id(),
                "message": "conference recording started",
                "recording_id": recording_id,
                "url": url,
            },
        )

    def _notice(self, request: Request, name: str, member_ids: str, kind: str) -> Response:
        body = _request_payload(request)
        required = "text" if kind == "Speak" else "url"
        if not body.get(required):
            return _error(400, f"{required} is required")
        with self._lock:
            conference = self.conferences.get(name)
            if conference is None:
                return _error(404, "not found")
            present = {member["member_id"] for member in conference["members"]}
            wanted = present if member_ids == "all" else set(member_ids.split(","))
            if not wanted <= present:
                return _error(404, "member not found")
            if self.notice_faults:
                fault = self.notice_faults.pop(0)
                return _error(fault, f"injected fault {fault}")
            self.notices.append(
                {"conference": name, "kind": kind, "member_ids": sorted(wanted), **body}
            )
        return _json(202, {"api_id": _api_id(), "message": f"{kind.lower()} queued"})

    def _delete_recording(self, recording_id: str) -> Response:
        with self._lock:
            if self.delete_faults:
                fault = self.delete_faults.pop(0)
                return _error(fault, f"injected fault {fault}")
            if self.recordings.pop(recording_id, None) is None:
                return _error(404, "not found")
            self.media.pop(recording_id, None)
            self.deleted_recordings.append(recording_id)
        return Response(status=204)

    def add_member(self, name: str, member: dict[str, Any]) -> dict[str, Any]:
        """A member enters a live conference; returns it as Plivo shows it."""
        with self._lock:
            members = self.conferences[name]["members"]
            entered = {
                "member_id": str(max((int(m["member_id"]) for m in members), default=0) + 1),
                "muted": False,
                "deaf": False,
                "from": "",
                "to": "",
                "caller_name": "",
                "direction": "inbound",
                "call_uuid": str(uuid.uuid4()),
                "join_time": "0",
                **member,
            }
            members.append(entered)
        return dict(entered)

    def _stop_recording(self, name: str) -> Response:
        with self._lock:
            if name not in self.conferences:
                return _error(404, "not found")
            for recording in self.recordings.values():
                if recording["conference_name"] == name and recording["state"] == "recording":
                    recording["state"] = "stopped"
        return Response(status=204)

    def _list_recordings(self, request: Request, auth_id: str) -> Response:
        query = request.args.to_dict()
        try:
            limit = int(query.pop("limit", PAGE_LIMIT_MAX))
            offset = int(query.pop("offset", 0))
        except ValueError:
            return _error(400, "limit and offset must be integers")
        if not 1 <= limit <= PAGE_LIMIT_MAX or offset < 0:
            return _error(400, f"limit must be 1 to {PAGE_LIMIT_MAX}, offset 0 or more")
        try:
            bounds = {
                name: (ADD_TIME_FILTERS[name], _parse_time(value))
                for name, value in query.items()
                if name in ADD_TIME_FILTERS
            }
        except ValueError:
            return _error(400, "add_time filters look like 2023-11-14 22:23[:41[.123456]]")
        now = datetime.now(UTC)
        if not bounds:
            bounds["add_time__gte"] = (operator.ge, now - DEFAULT_LIST_WINDOW)
        lower = [bound for name, (_, bound) in bounds.items() if name.startswith("add_time__gt")]
        upper = [bound for name, (_, bound) in bounds.items() if name.startswith("add_time__lt")]
        if not lower or min(upper or [now]) - max(lower) > MAX_LIST_WINDOW:
            return _error(400, "the add_time range must not be longer than 30 days")
        with self._lock:
            finished = [
                recording
                for recording in self.recordings.values()
                if recording["state"] == "finished"
                and all(
                    str(recording.get(field, "")) == query[field]
                    for field in ("conference_name", "call_uuid")
                    if field in query
                )
                and all(
                    accepts(_parse_time(recording["add_time"]), bound)
                    for accepts, bound in bounds.values()
                )
            ]
            # Newest first, as Plivo lists them.
            finished.sort(key=lambda recording: recording["add_time"], reverse=True)
            page = [_recording_view(recording) for recording in finished[offset : offset + limit]]
        total = len(finished)
        list_path = f"/v1/Account/{auth_id}/Recording/?"
        next_page = previous_page = None
        if offset + limit < total:
            next_page = list_path + urlencode({**query, "limit": limit, "offset": offset + limit})
        if offset > 0:
            previous_offset = max(offset - limit, 0)
            previous_page = list_path + urlencode(
                {**query, "limit": limit, "offset": previous_offset}
            )
        meta = {
            "limit": limit,
            "offset": offset,
            "total_count": total,
            "next": next_page,
            "previous": previous_page,
        }
        return _json(200, {"api_id": _api_id(), "meta": meta, "objects": page})

    def _serve_media(self, request: Request, filename: str) -> Response:
        recording_id, _, extension = filename.rpartition(".")
        with self._lock:
            self.media_requests.append((request.path, "Authorization" in request.headers))
            faults = self.media_faults.get(recording_id)
            fault = faults.pop(0) if faults else None
        if fault == "stall":
            self._stopping.wait(self.stall_seconds)
            fault = None
        if fault is not None and fault.isdigit():
            return _error(int(fault), f"injected fault {fault}")
        if fault is not None and fault.startswith("redirect:"):
            return Response(status=302, headers={"Location": fault.removeprefix("redirect:")})
        if fault not in (None, "truncate"):
            return _error(500, f"unknown injected media fault {fault!r}")
        with self._lock:
            content = self.media.get(recording_id)
        if content is None:
            return _error(404, "not found")
        # Content-Length is always the full size: a truncated answer then ends early, and
        # werkzeug closes every connection after its response, so the client sees it cut short.
        sent = content[: len(content) // 2] if fault == "truncate" else content
        return Response(
            _chunks(sent),
            status=200,
            headers={"Content-Length": str(len(content))},
            content_type=MEDIA_CONTENT_TYPES.get(extension, "application/octet-stream"),
            direct_passthrough=True,
        )

    def _new_recording(
        self,
        recording_id: str,
        conference_name: str,
        file_format: str,
        callback_url: str | None,
        callback_method: str,
    ) -> dict[str, Any]:
        """Remember a recording in progress (caller holds the lock)."""
        recording: dict[str, Any] = {
            "recording_id": recording_id,
            "conference_name": conference_name,
            "call_uuid": "",
            "recording_format": file_format,
            "recording_type": "conference",
            "recording_url": self.media_url(recording_id, file_format),
            "add_time": None,
            "recording_duration_ms": None,
            "recording_start_ms": None,
            "recording_end_ms": None,
            "resource_uri": f"/v1/Account/{self.auth_id}/Recording/{recording_id}/",
            "callback_url": callback_url,
            "callback_method": callback_method,
            "started_at": time.time(),
            "state": "recording",
        }
        self.recordings[recording_id] = recording
        return recording


def _request_payload(request: Request) -> dict[str, Any]:
    """What a REST request carried: its JSON or form body, or its query on GET and DELETE."""
    if request.is_json:
        body = request.get_json(silent=True)
        return dict(body) if isinstance(body, dict) else {}
    if request.form:
        return request.form.to_dict()
    return request.args.to_dict()


def _recording_view(recording: Mapping[str, Any]) -> dict[str, Any]:
    return {field: recording[field] for field in RECORDING_API_FIELDS}


def _json(status: int, body: Mapping[str, Any]) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json(status, {"api_id": _api_id(), "error": message})


def _chunks(content: bytes) -> Iterator[bytes]:
    for start in range(0, len(content), MEDIA_CHUNK_BYTES):
        yield content[start : start + MEDIA_CHUNK_BYTES]


def _api_id() -> str:
    return str(uuid.uuid4())


def _fresh_nonce() -> str:
    """A random 20-digit nonce, like the ones Plivo sends."""
    return str(10**19 + secrets.randbelow(9 * 10**19))


def _plivo_ms(value: float) -> str:
    """Milliseconds as Plivo writes them: "345100.00000"."""
    return f"{value:.5f}"


def _plivo_time(moment: datetime) -> str:
    """A time as Plivo writes `add_time`: "2023-11-14 22:23:41.123456+00:00"."""
    return moment.astimezone(UTC).isoformat(sep=" ", timespec="microseconds")


def _parse_time(text: str) -> datetime:
    """A Plivo time or time filter, taken as UTC when it names no zone."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def basic_auth_header(username: str, password: str) -> str:
    """The Authorization header value requests sends for HTTP Basic auth."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
