"""Downloading a recording from Plivo's media host, and refusing to download from anywhere else."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import requests

from webhook.config import PLIVO_MEDIA_HOSTS, Settings
from webhook.testcall import is_test_audio_url

MAX_REDIRECTS = 5
TIMEOUT = (5.0, 60.0)  # (connect, between bytes)


class RefusedURL(Exception):
    """The URL is not one the worker may fetch: retrying will not help."""


class MediaError(Exception):
    """The media host failed; worth retrying later."""


class MediaNotReady(MediaError):
    """The media host does not have the file yet (Plivo answers 404 until a recording is done)."""


def host_allowed(host: str, settings: Settings) -> bool:
    """Whether RECORDING_HOSTS names this host (`*.example.com` entries match subdomains)."""
    for entry in settings.recording_hosts:
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return True
        if host == entry:
            return True
    return False


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise MediaError(f"cannot resolve {host}: {exc}") from exc
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def check_url(url: str, settings: Settings) -> None:
    """Refuse what RECORDING_HOSTS does not list, non-http(s) schemes, and private addresses.

    A name that resolves to a private, loopback or link-local address is refused unless that very
    host was listed in RECORDING_HOSTS by the operator (as the tests list 127.0.0.1).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RefusedURL(f"record_url scheme {parts.scheme!r} is not http or https")
    host = (parts.hostname or "").lower()
    if not host:
        raise RefusedURL("record_url has no host")
    if is_test_audio_url(url, settings):
        # `webhook send-test-callback`'s audio, served by this service at the PUBLIC_URL the
        # operator set: as if that host were listed for that one path.
        return
    if not host_allowed(host, settings):
        raise RefusedURL(f"record_url host {host} is not in RECORDING_HOSTS")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise RefusedURL(f"record_url has a bad port: {exc}") from exc
    listed_explicitly = settings.recording_hosts_listed and host in settings.recording_hosts
    if listed_explicitly:
        return
    for address in _addresses(host, port):
        if not address.is_global:
            raise RefusedURL(f"record_url host {host} resolves to non-public address {address}")


def open_media(
    url: str, settings: Settings, http: requests.Session | None = None
) -> requests.Response:
    """Start streaming the recording at `url`, following redirects only to allowed hosts.

    Plivo's credentials go only over https and only to Plivo's own media hosts, never to a host a
    redirect or a forged URL names.
    """
    http = http or requests.Session()
    # No .netrc credentials or proxy settings from the environment on a URL that came from outside.
    http.trust_env = False
    credentials = (
        (settings.plivo_auth_id, settings.plivo_auth_token)
        if settings.plivo_auth_id and settings.plivo_auth_token
        else None
    )
    for _hop in range(MAX_REDIRECTS + 1):
        check_url(url, settings)
        parts = urlsplit(url)
        send_auth = parts.scheme == "https" and (parts.hostname or "").lower() in PLIVO_MEDIA_HOSTS
        try:
            response = http.get(
                url,
                stream=True,
                allow_redirects=False,
                timeout=TIMEOUT,
                auth=credentials if send_auth else None,
                # The archive keeps the file itself, not a gzip of it (requests asks for gzip).
                headers={"Accept-Encoding": "identity"},
            )
        except requests.RequestException as exc:
            raise MediaError(f"media download failed: {exc}") from exc
        if response.is_redirect:
            location = response.headers.get("Location", "")
            response.close()
            url = urljoin(url, location)
            continue
        if response.status_code == 404:
            response.close()
            raise MediaNotReady("media host answered 404 (recording not ready yet?)")
        if response.status_code != 200:
            response.close()
            raise MediaError(f"media host answered {response.status_code}")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            response.close()
            raise MediaError(f"media host sent Content-Encoding {encoding}, not the file itself")
        return response
    raise MediaError(f"more than {MAX_REDIRECTS} redirects")
