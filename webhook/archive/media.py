"""Downloading a recording from Plivo's media host, and refusing to download from anywhere else.

One parser decides everything: requests prepares the URL (with urllib3's `parse_url`), the check
reads that prepared URL with the same `parse_url`, and the request sent is that prepared request.
The connection is pinned to the address the check resolved and approved (TLS still verifies the
certificate against the host name, and the Host header carries the name), so neither a second
parser nor a second DNS answer can send the request, or Plivo's credentials, anywhere else.

A download is bounded in size (what a recording of its duration and format can be), in time (a
deadline for the whole download, a minimum rate while waiting on the host) and stops within a
moment of the worker being told to stop, even while a read is blocked: a watchdog cuts the socket.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import requests
import urllib3
import urllib3.connection
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.auth import HTTPBasicAuth
from urllib3.util import parse_url

from webhook.archive.background import OnDemandThread
from webhook.archive.storage import Interrupted
from webhook.config import PLIVO_MEDIA_HOSTS, Settings
from webhook.testcall import is_test_audio_url

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
CONNECT_TIMEOUT = 5.0
WATCH_SECONDS = 0.1  # how often a running download checks its deadline and the stop signal
WATCHDOG_IDLE_SECONDS = 1.0  # the watchdog's thread ends when no download has run for this long
SNIFF_BYTES = 12  # enough leading bytes to tell an mp3 or a wav from anything else

# The most bytes a second of each format can take (MPEG-1 Layer III tops out at 320 kbit/s; PCM
# WAV at 48 kHz, 16 bits, stereo; Plivo records far less), twice over, plus room for headers
# and tags: anything larger than this for the recording's duration is not that recording.
MAX_BYTES_PER_SECOND = {"mp3": 320_000 // 8, "wav": 48_000 * 2 * 2}
SIZE_MARGIN = 2
SIZE_ALLOWANCE = 1024 * 1024

# Content types a media host may label each format with; a generic binary type (S3 serves
# objects stored without one as binary/octet-stream) or none leaves the decision to the bytes.
CONTENT_TYPES = {
    "mp3": {"audio/mpeg", "audio/mp3", "audio/mpeg3", "audio/x-mpeg", "audio/x-mpeg-3"},
    "wav": {"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"},
}
GENERIC_CONTENT_TYPES = {"", "application/octet-stream", "binary/octet-stream"}

HOST_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
# A last label that getaddrinfo would read as a number (2130706433, 0x7f.1, 0177.1, 127.1).
NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
# NAT64 (RFC 6052): an address in it reaches the IPv4 address in its last 32 bits.
NAT64 = ipaddress.ip_network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedURL(Exception):
    """The URL is not one the worker may fetch: retrying will not help."""


class RefusedMedia(Exception):
    """The media host sent something that is not the recording: retrying will not help."""


class MediaError(Exception):
    """The media host failed; worth retrying later."""


class MediaNotReady(MediaError):
    """The media host does not have the file yet (Plivo answers 404 until a recording is done)."""


@dataclass(frozen=True)
class Target:
    """A URL the check approved: where its request goes and whether Plivo's credentials may."""

    url: str  # the prepared URL, exactly as it is sent
    scheme: str
    host: str  # as urllib3 parses it: lower case, IDNA-encoded, IPv6 in brackets
    port: int
    address: Address  # the connection goes here and nowhere else
    send_credentials: bool

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Limits:
    """How much one download may take: bytes, seconds in all, and the slowest rate accepted."""

    file_format: str
    max_bytes: int
    size_reason: str  # why max_bytes, for the error that names it
    deadline_seconds: float
    read_timeout_seconds: float
    min_bytes_per_second: int


def media_limits(file_format: str | None, duration_ms: int | None, settings: Settings) -> Limits:
    """The bounds of a download of a recording of this format and duration (None: unknown)."""
    fmt = file_format if file_format in MAX_BYTES_PER_SECOND else "mp3"
    if duration_ms is None:
        max_bytes = settings.media_max_bytes
        reason = "MEDIA_MAX_BYTES, the recording's duration being unknown"
    else:
        seconds = math.ceil(max(duration_ms, 0) / 1000)
        max_bytes = SIZE_ALLOWANCE + SIZE_MARGIN * MAX_BYTES_PER_SECOND[fmt] * seconds
        reason = f"the most {seconds} s of {fmt} can take"
    return Limits(
        file_format=fmt,
        max_bytes=max_bytes,
        size_reason=reason,
        deadline_seconds=settings.media_deadline_seconds,
        read_timeout_seconds=settings.media_read_timeout_seconds,
        min_bytes_per_second=settings.media_min_bytes_per_second,
    )


def host_allowed(host: str, settings: Settings) -> bool:
    """Whether RECORDING_HOSTS names this host (`*.example.com` entries match subdomains)."""
    for entry in settings.recording_hosts:
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return True
        if host == entry:
            return True
    return False


def _ip_literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]").split("%", 1)[0])
    except ValueError:
        return None


def _check_host_name(host: str) -> None:
    labels = host.split(".")
    if len(host) > 253 or not all(HOST_LABEL.match(label) for label in labels):
        raise RefusedURL(f"record_url host {host!r} is not a valid host name")
    if NUMERIC_LABEL.match(labels[-1]):
        raise RefusedURL(f"record_url host {host!r} is an IP address in a non-standard form")


def _resolve(host: str, port: int) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as exc:
        raise RefusedURL(f"record_url host {host!r} cannot be looked up: {exc}") from exc
    except OSError as exc:
        raise MediaError(f"cannot resolve {host}: {exc}") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        raise MediaError(f"cannot resolve {host}: no address")
    return addresses


def _is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is not None and not embedded.is_global:
            return False
    return address.is_global


def check_url(url: str, settings: Settings) -> Target:
    """Approve `url` (as requests prepares it) and the address to connect to, or refuse it.

    Refused: schemes other than http(s), URLs carrying credentials, hosts RECORDING_HOSTS does
    not list, malformed host names, and hosts resolving to a private, loopback or link-local
    address unless that very host was listed in RECORDING_HOSTS (as the tests list 127.0.0.1).
    The one exception is this service's own test audio at PUBLIC_URL (`is_test_audio_url`).
    """
    try:
        parts = parse_url(url)
    except urllib3.exceptions.LocationParseError as exc:
        raise RefusedURL(f"record_url cannot be parsed: {exc}") from exc
    scheme = (parts.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise RefusedURL(f"record_url scheme {scheme!r} is not http or https")
    if parts.auth is not None:
        raise RefusedURL("record_url carries credentials")
    host = (parts.host or "").lower()
    if not host:
        raise RefusedURL("record_url has no host")
    # `webhook send-test-callback`'s audio, served by this service at the PUBLIC_URL the
    # operator set: as if that host were listed in RECORDING_HOSTS, for that one path only.
    test_audio = is_test_audio_url(url, settings)
    if not test_audio and not host_allowed(host, settings):
        raise RefusedURL(f"record_url host {host} is not in RECORDING_HOSTS")
    literal = _ip_literal(host)
    if literal is None:
        # A wildcard entry lets through names the resolver cannot take (`a..plivo.com`).
        _check_host_name(host)
    port = parts.port or (443 if scheme == "https" else 80)
    addresses = [literal] if literal is not None else _resolve(host, port)
    listed_explicitly = test_audio or (
        settings.recording_hosts_listed and host in settings.recording_hosts
    )
    if not listed_explicitly:
        for address in addresses:
            if not _is_public(address):
                raise RefusedURL(f"record_url host {host} resolves to non-public address {address}")
    return Target(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        address=addresses[0],
        send_credentials=scheme == "https" and host in PLIVO_MEDIA_HOSTS,
    )


class _HTTPConnection(urllib3.connection.HTTPConnection):
    """Keeps its socket after http.client hands it to the response, so a read can be cut."""

    kept_socket: socket.socket | None = None

    def connect(self) -> None:
        super().connect()
        self.kept_socket = self.sock


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    """Keeps its (TLS) socket after http.client hands it to the response."""

    kept_socket: socket.socket | None = None

    def connect(self) -> None:
        super().connect()
        self.kept_socket = self.sock


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


# A kept-alive media connection unused for this long is closed rather than reused: a NAT or the
# host may have dropped it without a word, and a read on it would wait out the read timeout.
MEDIA_IDLE_SECONDS = 10.0


class _PinnedPools:
    """This process's connections to approved addresses, kept alive from one download to the
    next. A pool is keyed by the address the check approved (and, for TLS, the host name the
    certificate is checked against), so a connection is only ever reused for a request that was
    approved for that very address."""

    def __init__(self) -> None:
        self._pools = urllib3.PoolManager(num_pools=10, maxsize=4, block=False)
        self._pools.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._last_used = -math.inf
        self._lock = threading.Lock()

    def get(self) -> urllib3.PoolManager:
        with self._lock:
            now = time.monotonic()
            if now - self._last_used > MEDIA_IDLE_SECONDS:
                self._pools.clear()  # a download under way keeps its connection until it ends
            self._last_used = now
            return self._pools


_PINNED_POOLS = _PinnedPools()


class PinnedAdapter(HTTPAdapter):
    """Sends one approved request, connecting to the approved address only.

    TLS keeps the host name for SNI and for checking the certificate, so pinning the address
    weakens nothing; a request for any other URL than the approved one is refused.
    """

    def __init__(self, target: Target, dialled: Callable[[Target], None]) -> None:
        super().__init__(max_retries=0)
        self.target = target
        self.dialled = dialled

    def init_poolmanager(self, *_args: Any, **_kwargs: Any) -> None:
        """The process's kept-alive pinned connections, not a pool of this adapter's own."""
        self.poolmanager = _PINNED_POOLS.get()

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[Any, Any]:
        if request.url != self.target.url:
            raise RefusedURL(f"{request.url} is not the URL that was checked")
        _, tls = super().build_connection_pool_key_attributes(request, verify, cert)
        pool_kwargs: dict[str, Any] = dict(tls)
        if self.target.scheme == "https":
            name = self.target.host.removeprefix("[").removesuffix("]")
            pool_kwargs["server_hostname"] = name
            pool_kwargs["assert_hostname"] = name
        self.dialled(self.target)
        host = {
            "scheme": self.target.scheme,
            "host": str(self.target.address),
            "port": self.target.port,
        }
        return host, pool_kwargs


def _no_record(_target: Target) -> None:
    pass


def _media_type(response: requests.Response) -> str:
    return response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def looks_like(file_format: str, head: bytes) -> bool:
    """Whether the leading bytes are those of an mp3 (ID3 tag or frame sync) or a wav (RIFF)."""
    if file_format == "wav":
        return head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE"
    frame_sync = len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0
    return head.startswith(b"ID3") or frame_sync


class Download:
    """The body of an approved answer, read within its limits; use as a context manager."""

    def __init__(
        self,
        response: requests.Response,
        limits: Limits,
        interrupted: Callable[[], bool],
    ) -> None:
        self.response = response
        self.limits = limits
        self.interrupted = interrupted
        self.size = 0
        self._pending = b""
        self._started = time.monotonic()
        self._waited = 0.0  # seconds spent blocked on the media host
        self._waiting_since: float | None = None
        self._verdict: Exception | None = None
        length = response.headers.get("Content-Length", "").strip()
        self.expected = int(length) if length.isascii() and length.isdigit() else None
        _WATCHDOG.watch(self)

    def __enter__(self) -> Download:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        _WATCHDOG.forget(self)
        self.response.close()

    # --- the watchdog: deadline, rate and stop, even while a read is blocked -----------------

    def check(self) -> bool:
        """The watchdog's look: cut the download if it must end; whether it did."""
        verdict = self._judge()
        if verdict is None:
            return False
        self._verdict = verdict
        self._cut()
        return True

    def _judge(self) -> Exception | None:
        if self.interrupted():
            return Interrupted("stopped while downloading")
        now = time.monotonic()
        elapsed = now - self._started
        if elapsed > self.limits.deadline_seconds:
            return MediaError(
                f"media download timed out: not done after {self.limits.deadline_seconds:g} s "
                f"(MEDIA_DEADLINE_SECONDS), {self.size} bytes received"
            )
        since = self._waiting_since  # read once: the reading thread changes it
        waited = self._waited + (now - since if since is not None else 0.0)
        grace = self.limits.read_timeout_seconds
        if waited > grace and self.size / waited < self.limits.min_bytes_per_second:
            return MediaError(
                f"media host too slow: {self.size} bytes in {waited:.1f} s of waiting, below "
                f"{self.limits.min_bytes_per_second} bytes/s (MEDIA_MIN_BYTES_PER_SECOND)"
            )
        return None

    def _cut(self) -> None:
        """Shut the socket under a blocked read, so that the read returns at once."""
        connection = getattr(self.response.raw, "connection", None)
        sock = getattr(connection, "kept_socket", None)
        if sock is not None:
            # Already closed is fine: the read is over anyway. socket.socket's own shutdown, not
            # SSLSocket's, which would try to write a TLS alert from this thread.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    # --- reading ----------------------------------------------------------------------------

    def _read_raw(self, size: int) -> bytes:
        if self._verdict is not None:
            raise self._verdict
        self._waiting_since = time.monotonic()
        try:
            # read1: whatever has arrived (a read of `size` would wait for all of it, and the
            # watchdog would see no progress from a slow but steady host).
            chunk: bytes = self.response.raw.read1(size, decode_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if self._verdict is not None:
                raise self._verdict from exc
            raise MediaError(f"media download failed: {exc}") from exc
        finally:
            self._waited += time.monotonic() - self._waiting_since
            self._waiting_since = None
        if self._verdict is not None:
            raise self._verdict
        if not chunk and self.expected is not None and self.size != self.expected:
            raise MediaError(f"media host promised {self.expected} bytes and sent {self.size}")
        self.size += len(chunk)
        if self.size > self.limits.max_bytes:
            raise RefusedMedia(
                f"media host sent more than {self.limits.max_bytes} bytes "
                f"({self.limits.size_reason})"
            )
        return chunk

    def sniff(self) -> None:
        """Refuse a body whose leading bytes are not audio of the recording's format."""
        head = b""
        while len(head) < SNIFF_BYTES:
            chunk = self._read_raw(SNIFF_BYTES - len(head))
            if not chunk:
                break
            head += chunk
        if not looks_like(self.limits.file_format, head):
            raise RefusedMedia(
                f"media host sent something that is not {self.limits.file_format} audio "
                f"(it begins {head[:8]!r})"
            )
        self._pending = head

    def read(self, size: int) -> bytes:
        """Up to `size` bytes of the body (b"" at its end)."""
        if self._pending:
            chunk, self._pending = self._pending[:size], self._pending[size:]
            return chunk
        return self._read_raw(size)


class _Watchdog(OnDemandThread):
    """Every WATCH_SECONDS, one thread looks at each download of the process under way and cuts
    the one that must end (`Download.check`), even while its read is blocked; it ends once no
    download has been under way for WATCHDOG_IDLE_SECONDS."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Nothing watched and no thread; also in a forked child, whatever its parent had."""
        super().__init__("media-watchdog")
        self._downloads: set[Download] = set()

    def watch(self, download: Download) -> None:
        with self._lock:
            self._downloads.add(download)
            try:
                self._wake()
            except BaseException:
                self._downloads.discard(download)
                raise

    def forget(self, download: Download) -> None:
        with self._lock:
            self._downloads.discard(download)

    def _serve(self) -> None:
        idle_since = time.monotonic()
        while True:
            time.sleep(WATCH_SECONDS)
            with self._lock:
                downloads = list(self._downloads)
                if downloads:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= WATCHDOG_IDLE_SECONDS:
                    self._running = False  # under the lock: a `watch` now starts another
                    return
            for download in downloads:
                try:
                    ended = download.check()
                except Exception:
                    # Not the watch over the others: this one is left to its read timeout.
                    log.exception("media watchdog: a download could not be checked")
                    ended = True
                if ended:
                    self.forget(download)


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.reset)


def open_media(
    url: str,
    settings: Settings,
    limits: Limits,
    interrupted: Callable[[], bool] = lambda: False,
    dialled: Callable[[Target], None] = _no_record,
) -> Download:
    """Start the download of the recording at `url`, following redirects only to allowed hosts.

    Every hop is prepared, checked and sent as one request to the address the check approved.
    Plivo's credentials go only over https and only to Plivo's own media hosts, never to a host
    a redirect or a forged URL names. The answer must be audio of the recording's format.
    `dialled` is told of each approved hop before its connection is made.
    """
    credentials = (
        HTTPBasicAuth(settings.plivo_auth_id, settings.plivo_auth_token)
        if settings.plivo_auth_id and settings.plivo_auth_token
        else None
    )
    with requests.Session() as http:
        # No .netrc credentials or proxy settings from the environment on a URL from outside.
        http.trust_env = False
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                # The archive keeps the file itself, not a gzip of it (requests asks for gzip).
                request = http.prepare_request(
                    requests.Request("GET", url, headers={"Accept-Encoding": "identity"})
                )
            except (requests.RequestException, ValueError) as exc:
                raise RefusedURL(f"record_url cannot be prepared: {exc}") from exc
            assert request.url is not None
            target = check_url(request.url, settings)
            request.headers["Host"] = target.host_header
            if credentials is not None and target.send_credentials:
                request = credentials(request)
            # The adapter itself, not Session.send: that one prepares a redirect's next request
            # with its own parsing even when told not to follow it.
            adapter = PinnedAdapter(target, dialled)
            try:
                response = adapter.send(
                    request, stream=True, timeout=(CONNECT_TIMEOUT, limits.read_timeout_seconds)
                )
            except requests.RequestException as exc:
                raise MediaError(f"media download failed: {exc}") from exc
            if response.is_redirect:
                location = http.get_redirect_target(response) or ""
                response.close()
                url = requests.compat.urljoin(target.url, location)
                continue
            return _accept(response, limits, interrupted)
    raise MediaError(f"more than {MAX_REDIRECTS} redirects")


def _accept(
    response: requests.Response, limits: Limits, interrupted: Callable[[], bool]
) -> Download:
    """The download of a final answer, once its status, headers and leading bytes are right."""
    try:
        if response.status_code == 404:
            raise MediaNotReady("media host answered 404 (recording not ready yet?)")
        if response.status_code != 200:
            raise MediaError(f"media host answered {response.status_code}")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise MediaError(f"media host sent Content-Encoding {encoding}, not the file itself")
        media_type = _media_type(response)
        fmt = limits.file_format
        if media_type not in CONTENT_TYPES[fmt] | GENERIC_CONTENT_TYPES:
            raise RefusedMedia(f"media host sent Content-Type {media_type}, not {fmt} audio")
        download = Download(response, limits, interrupted)
    except BaseException:
        response.close()
        raise
    try:
        if download.expected is not None and download.expected > limits.max_bytes:
            raise RefusedMedia(
                f"media host announced {download.expected} bytes, more than {limits.max_bytes} "
                f"({limits.size_reason})"
            )
        download.sniff()
    except BaseException:
        download.close()
        raise
    return download
