"""Plivo's REST API: a small client on requests, aimed at PLIVO_API_URL."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from webhook.errors import PlivoError

log = logging.getLogger(__name__)
URL_OR_PATH = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*|/v1/\S*")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# (connect, read) seconds: an API call that takes longer is answered 504 to our own caller.
DEFAULT_TIMEOUT = (3.05, 15.0)
# Looking up a call is background work retried later: it must not hold the worker's loop long.
LOOKUP_TIMEOUT = (3.05, 5.0)


class PlivoClient:
    """The few Plivo REST calls the service makes, aimed at `base_url` (a fake one in tests)."""

    def __init__(
        self, auth_id: str, auth_token: str, base_url: str = "https://api.plivo.com"
    ) -> None:
        self.auth_id = auth_id
        self.account_url = f"{base_url.rstrip('/')}/v1/Account/{quote(auth_id, safe='')}/"
        self.http = requests.Session()
        self.http.auth = (auth_id, auth_token)
        self.http.headers["User-Agent"] = "plivo-recording-archive"
        self.lookup_timeout: tuple[float, float] = LOOKUP_TIMEOUT
        # Reads are retried on Plivo's 5xx and on connection errors; writes are not, because a
        # repeated "start recording" would start a second recording.
        retry = Retry(
            total=2,
            backoff_factor=0.3,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
        )
        self.http.mount(self.account_url, HTTPAdapter(max_retries=retry))

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        url = self.account_url + path
        timeout = kwargs.pop("timeout", DEFAULT_TIMEOUT)
        try:
            response = self.http.request(method, url, timeout=timeout, **kwargs)
        except requests.Timeout:
            raise PlivoError(504, "plivo_timeout", "Plivo did not answer in time") from None
        except requests.ConnectionError as exc:
            # After the GET retries run out on read timeouts, requests raises ConnectionError
            # wrapping urllib3's MaxRetryError(reason=ReadTimeoutError): still a timeout.
            reason = getattr(exc.args[0] if exc.args else None, "reason", None)
            if isinstance(reason, urllib3.exceptions.ReadTimeoutError):
                raise PlivoError(504, "plivo_timeout", "Plivo did not answer in time") from None
            raise self._unreachable(exc) from None
        except requests.RequestException as exc:
            raise self._unreachable(exc) from None
        if response.status_code in (200, 201, 202, 204):
            if not response.content:
                return {}
            try:
                body: dict[str, Any] = response.json()
            except ValueError:
                raise PlivoError(
                    502, "plivo_error", "Plivo answered with something not JSON"
                ) from None
            return body
        detail = _error_detail(response, self.auth_id)
        log.warning(
            "plivo refused a request",
            extra={"status": response.status_code, "method": method, "detail": detail},
        )
        said = f": {detail}" if detail else ""
        if response.status_code == 404:
            raise PlivoError(404, "not_found", f"Plivo has no such resource{said}")
        if response.status_code in (401, 403):
            raise PlivoError(
                502, "plivo_auth", f"Plivo refused the credentials in PLIVO_AUTH_ID/TOKEN{said}"
            )
        if 400 <= response.status_code < 500:
            raise PlivoError(400, "plivo_rejected", f"Plivo rejected the request{said}")
        raise PlivoError(502, "plivo_error", f"Plivo failed ({response.status_code}){said}")

    def _unreachable(self, exc: requests.RequestException) -> PlivoError:
        """Our caller learns that Plivo was not reached; the URL (which holds the account's auth
        ID) and the cause go to the log only."""
        log.warning(
            "plivo unreachable",
            extra={"error": _redact(str(exc), self.auth_id), "kind": type(exc).__name__},
        )
        return PlivoError(502, "plivo_unreachable", "Plivo could not be reached")

    def start_recording(
        self,
        conference_name: str,
        file_format: str,
        callback_url: str,
        transcription_url: str | None = None,
    ) -> dict[str, Any]:
        """Start recording a running conference; Plivo answers with the new `recording_id`.

        With a `transcription_url`, Plivo also transcribes the recording (it charges for it)
        and posts the transcript there.
        """
        body = {
            "file_format": file_format,
            "callback_url": callback_url,
            "callback_method": "POST",
        }
        if transcription_url:
            body.update(
                transcription_type="auto",
                transcription_url=transcription_url,
                transcription_method="POST",
            )
        return self._call(
            "POST", f"Conference/{quote(conference_name, safe='')}/Record/", json=body
        )

    def get_transcription(self, recording_id: str) -> dict[str, Any]:
        """The transcript Plivo made of a recording (404 PlivoError when it has none)."""
        return self._call("GET", f"Transcription/{quote(recording_id, safe='')}/")

    def order_transcription(self, recording_id: str, callback_url: str) -> dict[str, Any]:
        """Ask Plivo to transcribe an existing recording (charged); it calls back when done."""
        return self._call(
            "POST",
            f"Transcription/{quote(recording_id, safe='')}/",
            json={"transcription_callback_url": callback_url},
        )

    def stop_recording(self, conference_name: str) -> None:
        """Stop every recording of a conference."""
        self._call("DELETE", f"Conference/{quote(conference_name, safe='')}/Record/")

    def get_conference(self, conference_name: str) -> dict[str, Any]:
        """A running conference with its members."""
        return self._call("GET", f"Conference/{quote(conference_name, safe='')}/")

    def list_conferences(self) -> list[str]:
        """The names of the conferences live now."""
        names = self._call("GET", "Conference/").get("conferences") or []
        return [str(name) for name in names if isinstance(name, str) and name]

    def speak_to_members(
        self, conference_name: str, member_ids: list[str], text: str, voice: str, language: str
    ) -> None:
        """Speak text to some members of a live conference (Plivo's Speak API)."""
        self._call(
            "POST",
            f"{_members_path(conference_name, member_ids)}Speak/",
            json={"text": text, "voice": voice, "language": language},
        )

    def play_to_members(self, conference_name: str, member_ids: list[str], url: str) -> None:
        """Play an audio file (mp3 or wav) to some members of a live conference."""
        self._call("POST", f"{_members_path(conference_name, member_ids)}Play/", json={"url": url})

    def delete_recording(self, recording_id: str) -> None:
        """Delete a recording from Plivo's storage."""
        self._call("DELETE", f"Recording/{quote(recording_id, safe='')}/")

    def get_recording(self, recording_id: str) -> dict[str, Any]:
        """One recording's details (durations, times, URL)."""
        return self._call("GET", f"Recording/{quote(recording_id, safe='')}/")

    def get_call(self, call_uuid: str, live: bool = False) -> dict[str, Any]:
        """A call: while it is up (`live`, with from, to, caller_name, direction), or its record
        once it has ended (from_number, to_number, call_direction)."""
        return self._call(
            "GET",
            f"Call/{quote(call_uuid, safe='')}/",
            params={"status": "live"} if live else None,
            timeout=self.lookup_timeout,
        )

    def check_credentials(self) -> None:
        """Raise PlivoError unless Plivo accepts the credentials (one small, read-only call)."""
        self._call("GET", "Recording/", params={"limit": 1})

    def iter_recordings(self, **filters: str) -> Iterator[dict[str, Any]]:
        """Every recording matching the filters, following Plivo's pages (20 a page at most)."""
        offset = 0
        while True:
            page = self._call(
                "GET", "Recording/", params={**filters, "limit": 20, "offset": offset}
            )
            objects = page.get("objects") or []
            yield from objects
            if not objects or not (page.get("meta") or {}).get("next"):
                return
            offset += len(objects)


def _members_path(conference_name: str, member_ids: list[str]) -> str:
    # Plivo takes one member id, several separated by commas, or `all`.
    ids = ",".join(quote(member_id, safe="") for member_id in member_ids)
    return f"Conference/{quote(conference_name, safe='')}/Member/{ids}/"


def _redact(text: str, auth_id: str) -> str:
    """Text without URLs or API paths (they name the account) or the auth ID itself."""
    text = URL_OR_PATH.sub("<url>", text)
    return text.replace(auth_id, "<auth id>") if auth_id else text


def _error_detail(response: requests.Response, auth_id: str) -> str:
    """Plivo's own short error sentence, fit to show to our caller: redacted, one line, bounded.
    Anything but Plivo's JSON error shape (a proxy's HTML page, say) says nothing."""
    try:
        body = response.json()
    except ValueError:
        return ""
    said = (body.get("error") or body.get("message")) if isinstance(body, dict) else None
    if not isinstance(said, str):
        return ""
    return CONTROL_CHARACTERS.sub(" ", _redact(said, auth_id)).strip()[:200]
