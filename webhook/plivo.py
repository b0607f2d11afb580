"""Plivo's REST API (a small client on requests) and its V3 callback signature."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

# (connect, read) seconds: an API call that takes longer is answered 504 to our own caller.
DEFAULT_TIMEOUT = (3.05, 15.0)


class PlivoError(Exception):
    """Plivo could not do what was asked; `status` and `code` are what our own API answers."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


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
        try:
            response = self.http.request(method, url, timeout=DEFAULT_TIMEOUT, **kwargs)
        except requests.Timeout:
            raise PlivoError(504, "plivo_timeout", "Plivo did not answer in time") from None
        except requests.ConnectionError as exc:
            # After the GET retries run out on read timeouts, requests raises ConnectionError
            # wrapping urllib3's MaxRetryError(reason=ReadTimeoutError): still a timeout.
            reason = getattr(exc.args[0] if exc.args else None, "reason", None)
            if isinstance(reason, urllib3.exceptions.ReadTimeoutError):
                raise PlivoError(504, "plivo_timeout", "Plivo did not answer in time") from None
            raise PlivoError(
                502, "plivo_unreachable", f"Plivo could not be reached: {exc}"
            ) from None
        except requests.RequestException as exc:
            raise PlivoError(
                502, "plivo_unreachable", f"Plivo could not be reached: {exc}"
            ) from None
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
        detail = _error_detail(response)
        if response.status_code == 404:
            raise PlivoError(404, "not_found", f"Plivo has no such resource: {detail}")
        if response.status_code in (401, 403):
            raise PlivoError(
                502, "plivo_auth", f"Plivo refused the credentials in PLIVO_AUTH_ID/TOKEN: {detail}"
            )
        if 400 <= response.status_code < 500:
            raise PlivoError(400, "plivo_rejected", f"Plivo rejected the request: {detail}")
        raise PlivoError(502, "plivo_error", f"Plivo failed ({response.status_code}): {detail}")

    def start_recording(
        self, conference_name: str, file_format: str, callback_url: str
    ) -> dict[str, Any]:
        """Start recording a running conference; Plivo answers with the new `recording_id`."""
        return self._call(
            "POST",
            f"Conference/{quote(conference_name, safe='')}/Record/",
            json={
                "file_format": file_format,
                "callback_url": callback_url,
                "callback_method": "POST",
            },
        )

    def stop_recording(self, conference_name: str) -> None:
        """Stop every recording of a conference."""
        self._call("DELETE", f"Conference/{quote(conference_name, safe='')}/Record/")

    def get_conference(self, conference_name: str) -> dict[str, Any]:
        """A running conference with its members."""
        return self._call("GET", f"Conference/{quote(conference_name, safe='')}/")

    def get_recording(self, recording_id: str) -> dict[str, Any]:
        """One recording's details (durations, times, URL)."""
        return self._call("GET", f"Recording/{quote(recording_id, safe='')}/")

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


def _error_detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body)[:200]
    return str(body)[:200]


# --- Signature V3 -------------------------------------------------------------------------------

SIGNATURE_HEADERS = {
    "X-Plivo-Signature-V3": "v3",
    "X-Plivo-Signature-Ma-V3": "ma-v3",
}
NONCE_HEADER = "X-Plivo-Signature-V3-Nonce"

Params = Mapping[str, Sequence[str] | str]


def _sorted_pairs(params: Params) -> Iterable[tuple[str, str]]:
    for key in sorted(params):
        values = params[key]
        # A plain string is one value, not a sequence of characters.
        for value in sorted([values] if isinstance(values, str) else values):
            yield key, value


def signature_base(method: str, url: str, params: Params) -> str:
    """The string Plivo signs: the called URL (no fragment) and the params, as its SDKs build it.

    GET: the URL's query and the params merged, sorted, as `k=v&...`. POST: the URL's own sorted
    query, then `.` when there are both, then each body param as `keyvalue`, sorted, no separators.
    """
    parts = urlsplit(url)
    base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    url_query: dict[str, list[str]] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        url_query.setdefault(key, []).append(value)
    if method.upper() == "GET":
        # The query in the URL wins over a param of the same name, as in Plivo's SDKs.
        merged: dict[str, Sequence[str] | str] = {**params, **url_query}
        query = "&".join(f"{k}={v}" for k, v in _sorted_pairs(merged))
        return f"{base}?{query}" if query else base
    query = "&".join(f"{k}={v}" for k, v in _sorted_pairs(url_query))
    if not any(params.values()):
        return f"{base}?{query}" if query else base
    body = "".join(f"{k}{v}" for k, v in _sorted_pairs(params))
    return f"{base}?{query}.{body}" if query else f"{base}?{body}"


def sign(auth_token: str, base: str, nonce: str) -> str:
    """base64(HMAC-SHA256(auth_token, base + "." + nonce)), as Plivo computes it."""
    digest = hmac.new(
        auth_token.encode("utf-8"), f"{base}.{nonce}".encode(), hashlib.sha256
    ).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_matches(
    header_value: str, auth_token: str, method: str, url: str, params: Params, nonce: str
) -> bool:
    """Whether any comma-separated signature in the header is right (constant-time compare)."""
    expected = sign(auth_token, signature_base(method, url, params), nonce).encode("ascii")
    found = False
    for candidate in header_value.split(","):
        # Keep comparing after a match so the time taken does not depend on which one matched.
        found |= hmac.compare_digest(candidate.strip().encode("utf-8", "replace"), expected)
    return found
