"""`webhook send-test-callback`: a recording callback signed as Plivo signs it, sent to the
running service at PUBLIC_URL, whose audio the service itself serves (a second of silence)."""

from __future__ import annotations

import io
import re
import secrets
import time
import wave
from dataclasses import dataclass
from functools import cache

import requests
from urllib3.exceptions import LocationParseError
from urllib3.util import Url, parse_url

from webhook.config import Settings
from webhook.signature import NONCE_HEADER, sign, signature_base

TEST_CONFERENCE = "webhook send-test-callback"
TEST_AUDIO_PATH = "/test-audio/"
TEST_AUDIO_NAME = re.compile(r"^test-[A-Za-z0-9._-]{1,58}\.wav$")
SAMPLE_RATE = 8000


@cache
def silence_wav() -> bytes:
    """One second of 8 kHz 16-bit mono silence, as a WAV file (the same bytes every time)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(b"\x00\x00" * SAMPLE_RATE)
    return buffer.getvalue()


def _origin(parts: Url) -> tuple[str, str, int]:
    scheme = (parts.scheme or "").lower()
    return scheme, (parts.host or "").lower(), parts.port or (443 if scheme == "https" else 80)


def is_test_audio_url(url: str, settings: Settings) -> bool:
    """Whether `url` is this service's own test audio, under the PUBLIC_URL the operator set:
    the same scheme, host and port, the /test-audio/ path, a test recording's name, nothing else.

    Read with urllib3's parser, the one that prepared the request that will be sent (the media
    download checks the prepared URL, so the URL judged here is the URL fetched)."""
    if not settings.public_url:
        return False
    try:
        public, parts = parse_url(settings.public_url), parse_url(url)
    except LocationParseError:
        return False
    if _origin(parts) != _origin(public) or parts.auth is not None:
        return False
    if parts.query is not None or parts.fragment is not None:
        return False
    prefix = (public.path or "").rstrip("/") + TEST_AUDIO_PATH
    path = parts.path or ""
    return path.startswith(prefix) and bool(TEST_AUDIO_NAME.match(path.removeprefix(prefix)))


@dataclass(frozen=True)
class SentTestCallback:
    """What was sent and what the service answered."""

    recording_id: str
    url: str
    status: int
    body: str


def send_test_callback(settings: Settings, timeout: float = 15.0) -> SentTestCallback:
    """POST a signed test callback to PUBLIC_URL (requests.RequestException if unreachable)."""
    assert settings.public_url and settings.plivo_auth_token
    now_ms = int(time.time() * 1000)
    recording_id = f"test-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"
    params = {
        "api_id": f"test-{secrets.token_hex(8)}",
        "recording_id": recording_id,
        "conference_name": TEST_CONFERENCE,
        "record_url": f"{settings.public_url}{TEST_AUDIO_PATH}{recording_id}.wav",
        "recording_duration": "1",
        "recording_duration_ms": "1000",
        "recording_start_ms": str(now_ms - 1000),
        "recording_end_ms": str(now_ms),
    }
    url = settings.public_url + "/plivo/recording"
    nonce = secrets.token_hex(16)
    headers = {
        "X-Plivo-Signature-V3": sign(
            settings.plivo_auth_token, signature_base("POST", url, params), nonce
        ),
        NONCE_HEADER: nonce,
        "User-Agent": "webhook send-test-callback",
    }
    response = requests.post(url, data=params, headers=headers, timeout=timeout)
    return SentTestCallback(recording_id, url, response.status_code, response.text[:500])
