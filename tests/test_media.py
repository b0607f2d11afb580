"""Where media requests go: the host the check approves is the host the connection reaches.

Every host here is a real server on its own loopback address (127.0.0.11-14, one port shared by
all, TLS or plain on the same socket, a certificate trusted for every name), and names resolve
through a table to those addresses, never through DNS. A request is observed where it arrives:
which address, TLS or not, the SNI name, the Host header, whether Plivo's credentials came too.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests
import trustme
from flask import Flask
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import select

from tests.conftest import MP3_TAG, make_settings
from tests.fakeplivo import FakePlivo
from webhook import create_app, services
from webhook.archive import media
from webhook.archive.media import (
    MediaError,
    RefusedMedia,
    RefusedURL,
    Target,
    check_url,
    host_allowed,
    media_limits,
    open_media,
)
from webhook.archive.storage import Interrupted
from webhook.archive.worker import Worker
from webhook.config import Settings
from webhook.db import transaction
from webhook.models import Recording, Status
from webhook.recordings import parse_report, record_report

PLIVO = "127.0.0.11"
ALLOWED = "127.0.0.12"
EVIL = "127.0.0.13"
WILD = "127.0.0.14"
# The table the resolver answers from: Plivo's media host, another listed host, a host nobody
# listed, and a name under a wildcard entry.
NAMES = {
    "media.plivo.com": PLIVO,
    "allowed.test": ALLOWED,
    "evil.test": EVIL,
    "evil.example": EVIL,
    "a.wild.test": WILD,
}
RECORDING_HOSTS = "media.plivo.com,allowed.test,127.0.0.12,*.wild.test"
BODY = MP3_TAG + b"\xff\xfb" + b"\x00" * 200


@dataclass(frozen=True)
class Arrival:
    """One request as the server at `address` received it."""

    address: str
    tls: bool
    sni: str | None
    host: str | None
    authorization: str | None
    path: str


@dataclass
class Hosts:
    """The loopback servers and what reached them."""

    port: int = 0
    arrivals: list[Arrival] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, host: str, path: str = "/x.mp3", scheme: str = "https") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def redirect(self, via: str, to: str, scheme: str = "https") -> str:
        return self.url(via, f"/redirect?to={quote(to, safe='')}", scheme)

    def seen(self) -> list[Arrival]:
        with self.lock:
            return list(self.arrivals)

    def clear(self) -> None:
        with self.lock:
            self.arrivals.clear()


def send_audio(handler: BaseHTTPRequestHandler) -> None:
    """Answer 200 with BODY, as a media host serves an mp3."""
    handler.send_response(200)
    handler.send_header("Content-Type", "audio/mpeg")
    handler.send_header("Content-Length", str(len(BODY)))
    handler.end_headers()
    handler.wfile.write(BODY)


class _Handler(BaseHTTPRequestHandler):
    hosts: Hosts
    tls_context: ssl.SSLContext
    timeout = 5

    def setup(self) -> None:
        # TLS or plain on the same port: a TLS client speaks first with a handshake record.
        self.tls = False
        self.sni: str | None = None
        first = self.request.recv(1, socket.MSG_PEEK)
        if first == b"\x16":
            self.request = self.tls_context.wrap_socket(self.request, server_side=True)
            self.tls = True
            self.sni = getattr(self.request, "sni", None)
        super().setup()

    def finish(self) -> None:
        super().finish()
        if self.tls:
            self.request.close()  # the server closes only the plain socket it accepted

    def do_GET(self) -> None:
        arrival = Arrival(
            address=self.server.server_address[0],  # type: ignore[index]
            tls=self.tls,
            sni=self.sni,
            host=self.headers.get("Host"),
            authorization=self.headers.get("Authorization"),
            path=self.path,
        )
        with self.hosts.lock:
            self.hosts.arrivals.append(arrival)
        parts = urlsplit(self.path)
        if parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        send_audio(self)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def _remember_sni(sock: Any, name: str | None, _context: ssl.SSLContext) -> None:
    sock.sni = name


@pytest.fixture
def ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A CA that requests trusts for this test (as if it were a public one)."""
    authority = trustme.CA()
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    monkeypatch.setattr(requests.adapters, "DEFAULT_CA_BUNDLE_PATH", str(bundle))
    return authority


@pytest.fixture
def hosts(ca: trustme.CA) -> Iterator[Hosts]:
    # One certificate for every name and address: TLS is not what keeps a request home here.
    identities = [*NAMES, *NAMES.values(), "2130706445"]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*identities).configure_cert(context)
    context.sni_callback = _remember_sni
    found = Hosts()
    handler = type("Handler", (_Handler,), {"hosts": found, "tls_context": context})
    servers: list[ThreadingHTTPServer] = []
    for address in (PLIVO, ALLOWED, EVIL, WILD):
        server = ThreadingHTTPServer((address, found.port), handler)
        server.daemon_threads = True
        found.port = int(server.server_address[1])
        servers.append(server)
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}) for s in servers
    ]
    for thread in threads:
        thread.start()
    yield found
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join()


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names resolve from NAMES; numbers as the C library reads them; nothing reaches DNS.
    The list collects every name looked up."""
    real = socket.getaddrinfo
    looked_up: list[str] = []

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, *rest: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        looked_up.append(name)
        address = NAMES.get(name.lower().rstrip("."), name)
        proto = rest[0] if rest else 0
        return real(address, port, family, type, proto, socket.AI_NUMERICHOST)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


@pytest.fixture
def media_settings(database_url: str, tmp_path: Path, plivo: FakePlivo) -> Settings:
    return make_settings(
        database_url, f"file://{tmp_path}/archive", plivo, RECORDING_HOSTS=RECORDING_HOSTS
    )


@pytest.fixture
def app(media_settings: Settings) -> Iterator[Flask]:
    app = create_app({"TESTING": True, "SETTINGS": media_settings})
    yield app
    services(app).engine.dispose()


def archive(app: Flask, record_url: str) -> Recording:
    """Queue a recording at `record_url`, run the worker once, and answer its row."""
    report = parse_report(
        {"recording_id": "rec-1", "record_url": record_url, "recording_duration_ms": "1000"}
    )
    with transaction(services(app).sessions) as session:
        record_report(session, report)
    Worker(services(app)).run(once=True)
    with services(app).sessions() as session:
        return session.scalars(select(Recording)).one()


def fetch(settings: Settings, url: str) -> tuple[list[Target], Exception | None]:
    """Download `url` as the worker would; the hops the check approved, and the error if any."""
    approved: list[Target] = []
    limits = media_limits("mp3", 1000, settings)
    try:
        with open_media(url, settings, limits, dialled=approved.append) as download:
            while download.read(65536):
                pass
    except (RefusedURL, RefusedMedia, MediaError) as exc:
        return approved, exc
    return approved, None


def read_all(download: media.Download) -> bytes:
    data = b""
    while chunk := download.read(65536):
        data += chunk
    return data


@contextlib.contextmanager
def local_media_host(
    handler: type[BaseHTTPRequestHandler], database_url: str, tmp_path: Path, plivo: FakePlivo
) -> Iterator[tuple[Settings, str]]:
    """A media host on loopback answering with `handler`: settings allowing it, and a URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        settings = make_settings(
            database_url, f"file://{tmp_path}/archive", plivo, RECORDING_HOSTS="127.0.0.1"
        )
        yield settings, f"http://127.0.0.1:{server.server_address[1]}/recording.mp3"
    finally:
        server.shutdown()
        server.server_close()
        serving.join()


def resolved(host: str) -> str:
    bare = host.removeprefix("[").removesuffix("]").lower().rstrip(".")
    return NAMES.get(bare, bare)


# --- the attacks that worked --------------------------------------------------------------------


@pytest.mark.parametrize("authority", ["evil.example:{port}", "2130706445:{port}"])
def test_backslash_before_the_userinfo_sends_nothing_to_the_other_host(
    app, hosts, resolver, authority
) -> None:
    # urlsplit reads the host after `@`; requests (urllib3) ends the authority at the backslash.
    evil = authority.format(port=hosts.port)
    recording = archive(app, f"https://{evil}\\@media.plivo.com:{hosts.port}/x.mp3")

    assert hosts.seen() == []
    assert recording.status == Status.FAILED
    assert (recording.last_error or "").startswith("refused:")
    assert "RECORDING_HOSTS" in (recording.last_error or "")
    assert recording.archive_sha256 is None


def test_backslash_url_behind_a_redirect_gets_neither_request_nor_credentials(
    app, hosts, resolver
) -> None:
    forged = f"https://evil.example:{hosts.port}\\@media.plivo.com:{hosts.port}/x.mp3"
    recording = archive(app, hosts.redirect("media.plivo.com", forged))

    (first,) = hosts.seen()
    assert first.address == PLIVO and first.tls and first.sni == "media.plivo.com"
    assert recording.status == Status.FAILED
    assert "evil.example is not in RECORDING_HOSTS" in (recording.last_error or "")


def test_plivo_credentials_go_over_https_to_plivo_media_only(app, hosts, resolver) -> None:
    plain = hosts.url("media.plivo.com", scheme="http")
    other = hosts.url("allowed.test")
    for url in (hosts.url("media.plivo.com"), hosts.redirect("media.plivo.com", other), plain):
        hosts.clear()
        approved, error = fetch(services(app).settings, url)
        assert error is None, error
        arrivals = hosts.seen()
        assert [a.address for a in arrivals] == [resolved(t.host) for t in approved]
        for arrival in arrivals:
            gets_them = arrival.address == PLIVO and arrival.tls
            assert (arrival.authorization is not None) == gets_them, (url, arrival)
            if arrival.authorization:
                assert arrival.sni == "media.plivo.com"
                assert arrival.host == f"media.plivo.com:{hosts.port}"


def test_the_connection_goes_to_the_address_the_check_resolved(app, hosts, resolver) -> None:
    approved, error = fetch(services(app).settings, hosts.url("allowed.test", scheme="http"))

    assert error is None
    # Looked up once, by the check; the connection dialled that answer, not a fresh lookup.
    assert resolver.count("allowed.test") == 1
    assert [str(t.address) for t in approved] == [ALLOWED]
    (arrival,) = hosts.seen()
    assert arrival.address == ALLOWED
    assert arrival.host == f"allowed.test:{hosts.port}"


def test_a_certificate_for_another_name_is_refused_even_at_the_pinned_address(
    app, hosts, resolver, monkeypatch
) -> None:
    # The pinned address does not replace TLS: the certificate must match the URL's name.
    monkeypatch.setitem(NAMES, "unlisted-cert.wild.test", WILD)
    _approved, error = fetch(services(app).settings, hosts.url("unlisted-cert.wild.test"))
    assert isinstance(error, RefusedURL)  # a loopback address under a wildcard entry
    listed = services(app).settings.replace(
        recording_hosts=(*services(app).settings.recording_hosts, "unlisted-cert.wild.test")
    )
    _approved, error = fetch(listed, hosts.url("unlisted-cert.wild.test"))
    assert isinstance(error, MediaError)
    assert "certificate" in str(error).lower()
    assert hosts.seen() == []


def test_too_many_redirects_are_a_retryable_media_error(app, hosts, resolver) -> None:
    url = hosts.url("allowed.test", "/x.mp3", "http")
    for _ in range(media.MAX_REDIRECTS + 1):
        url = hosts.redirect("allowed.test", url, "http")
    approved, error = fetch(services(app).settings, url)
    assert isinstance(error, MediaError) and "redirects" in str(error)
    assert len(approved) == media.MAX_REDIRECTS + 1


@pytest.mark.parametrize(
    "url",
    [
        "https://a..plivo.com/x.mp3",
        "https://-a.plivo.com/x.mp3",
        f"https://{'a' * 64}.plivo.com/x.mp3",
        "http://user:secret@media.plivo.com/x.mp3",
        "http://media.plivo.com:99999/x.mp3",
    ],
)
def test_malformed_hosts_under_a_wildcard_are_refused_without_a_lookup(
    media_settings, resolver, url
) -> None:
    wildcard = media_settings.replace(recording_hosts=("*.plivo.com", "media.plivo.com"))
    with pytest.raises(RefusedURL):
        check_url(url, wildcard)
    assert resolver == []


# --- the fuzz test ------------------------------------------------------------------------------

SCHEMES = st.sampled_from(["http", "https", "HTTPS", "hTTp"])
HOSTS = st.sampled_from(
    [
        "media.plivo.com",
        "MEDIA.Plivo.COM",
        "media.plivo.com.",
        "allowed.test",
        "evil.test",
        "evil.example",
        "a.wild.test",
        "127.0.0.12",
        "127.0.0.13",
        "2130706444",  # 127.0.0.12, decimal
        "2130706445",  # 127.0.0.13, decimal
        "0x7f00000d",  # hex
        "0177.0.0.13",  # octal
        "127.13",  # short form
        "127.0.0.012",  # octal last part
        "[::ffff:127.0.0.12]",  # IPv4-mapped IPv6
        "[::ffff:7f00:d]",
        "[::1]",
        "m\u0435dia.plivo.com",  # Cyrillic e
        "media\u3002plivo.com",  # ideographic full stop
        "xn--mdia-v4d.plivo.com",
        "media%2eplivo.com",
        "%65vil.test",
        "evil.test%00.allowed.test",
    ]
)
USERINFO = st.sampled_from(
    ["", "user:pw@", "media.plivo.com@", "evil.test:{port}\\@", "evil.test%40", "@", ":@"]
)
PORTS = st.sampled_from([":{port}", ":0{port}", ":{port}:{port}", ":", ""])
TAILS = st.sampled_from(
    [
        "/x.mp3",
        "\\x.mp3",
        "\\@evil.test:{port}/x.mp3",
        "\\@media.plivo.com:{port}/x.mp3",
        "#@evil.test:{port}/x.mp3",
        "?@evil.test:{port}/x.mp3",
        "/%2e%2e/x.mp3",
        "@evil.test:{port}/x.mp3",
        " @evil.test:{port}/x.mp3",
        "\t/x.mp3",
    ]
)


@st.composite
def urls(draw: st.DrawFn, port: int) -> str:
    url = (f"{draw(SCHEMES)}://{draw(USERINFO)}{draw(HOSTS)}{draw(PORTS)}{draw(TAILS)}").replace(
        "{port}", str(port)
    )
    return url


@hypothesis_settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzz_the_host_the_check_approves_is_the_host_the_request_reaches(
    media_settings, hosts, resolver, data
) -> None:
    url = data.draw(urls(hosts.port), label="url")
    if data.draw(st.booleans(), label="behind a redirect"):
        url = hosts.redirect("media.plivo.com", url)
    hosts.clear()

    approved, _error = fetch(media_settings, url)

    arrivals = hosts.seen()
    for arrival in arrivals:
        # Whatever the check thought: the name a request carries is a listed one, and the
        # request reached that name's address.
        assert arrival.host is not None, (url, arrival)
        name = arrival.host.rsplit(":", 1)[0] if not arrival.host.endswith("]") else arrival.host
        assert host_allowed(name, media_settings), (url, arrival)
        assert resolved(name) == arrival.address, (url, arrival)
    # Every request that arrived was one the check approved, at the address it approved.
    assert len(arrivals) <= len(approved), (url, approved, arrivals)
    for arrival, target in zip(arrivals, approved, strict=False):
        assert arrival.address == str(target.address), (url, target, arrival)
        assert arrival.address == resolved(target.host), (url, target, arrival)
        assert host_allowed(target.host, media_settings)
        # The request names the host that was checked, in Host and (with TLS) in SNI.
        assert arrival.host == target.host_header, (url, target, arrival)
        if arrival.tls and resolved(target.host) != target.host.strip("[]"):
            # (A name, not an address: TLS sends no SNI for an IP address.)
            assert arrival.sni == target.host.rstrip("."), (url, target, arrival)
        # Plivo's credentials: over TLS, to Plivo's media host, nowhere else.
        if arrival.authorization is not None:
            assert arrival.tls and arrival.address == PLIVO, (url, arrival)
            assert target.host == "media.plivo.com", (url, target)
    for target in approved:
        assert target.send_credentials == (
            target.scheme == "https" and target.host == "media.plivo.com"
        )


def test_fuzz_strategy_reaches_every_server(media_settings, hosts, resolver) -> None:
    """The fuzz test's URLs do reach each host, so its assertions are not vacuous."""
    for host, address in (
        ("media.plivo.com", PLIVO),
        ("allowed.test", ALLOWED),
        ("127.0.0.12", ALLOWED),
    ):
        hosts.clear()
        _approved, error = fetch(media_settings, hosts.url(host))
        assert error is None, error
        assert [a.address for a in hosts.seen()] == [address]


# --- kept-alive connections -----------------------------------------------------------------------


def test_downloads_reuse_a_kept_alive_connection_to_the_approved_address_until_it_idles(
    database_url: str, tmp_path: Path, plivo: FakePlivo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog of recordings on one media host costs one connection, not one per recording;
    a connection left idle is closed rather than trusted (a NAT may have dropped it)."""
    connections: list[tuple[str, int]] = []

    class KeepAlive(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            connections.append(self.client_address)

        def do_GET(self) -> None:
            send_audio(self)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    with local_media_host(KeepAlive, database_url, tmp_path, plivo) as (settings, url):
        for _ in range(3):
            approved, error = fetch(settings, url)
            assert error is None and len(approved) == 1  # each download checked, as always
        assert len(connections) == 1

        monkeypatch.setattr(media, "MEDIA_IDLE_SECONDS", 0.0)
        assert fetch(settings, url)[1] is None
        assert len(connections) == 2


def test_one_watchdog_thread_watches_every_download_under_way_then_ends(
    database_url: str, tmp_path: Path, plivo: FakePlivo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloads under way at once share the process's one watchdog thread: it cuts the one told
    to stop, even in the middle of a blocked read, leaves the other alone, and ends once no
    download is under way."""
    release = threading.Event()

    class Stalling(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "audio/mpeg")
            self.send_header("Content-Length", str(2 * len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
            self.wfile.flush()
            release.wait(10)  # the second half comes only when the test says so
            self.wfile.write(BODY)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    def watchdogs() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "media-watchdog"]

    monkeypatch.setattr(media, "WATCHDOG_IDLE_SECONDS", 0.3)
    for earlier in watchdogs():  # an earlier test's, idle: it ends on its own
        earlier.join(timeout=3)
    with local_media_host(Stalling, database_url, tmp_path, plivo) as (settings, url):
        limits = media_limits("mp3", 1000, settings)
        stop = threading.Event()
        with (
            open_media(url, settings, limits, stop.is_set) as stopped,
            open_media(url, settings, limits) as going,
        ):
            ours = watchdogs()
            assert len(ours) == 1
            stop.set()
            cut_after = time.monotonic()
            with pytest.raises(Interrupted):
                read_all(stopped)  # blocks after the first half until the watchdog cuts it
            assert time.monotonic() - cut_after < 2
            release.set()
            assert read_all(going) == 2 * BODY
        ours[0].join(timeout=3)
        assert not ours[0].is_alive() and watchdogs() == []


class QuickAudio(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        send_audio(self)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def test_a_watchdog_that_could_not_start_is_started_by_the_next_download(
    database_url: str, tmp_path: Path, plivo: FakePlivo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(media, "WATCHDOG_IDLE_SECONDS", 0.3)
    for earlier in [t for t in threading.enumerate() if t.name == "media-watchdog"]:
        earlier.join(timeout=3)
    start = threading.Thread.start

    def refuse(thread: threading.Thread) -> None:
        if thread.name == "media-watchdog":
            raise RuntimeError("can't start new thread")
        start(thread)

    with local_media_host(QuickAudio, database_url, tmp_path, plivo) as (settings, url):
        limits = media_limits("mp3", 1000, settings)
        monkeypatch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError):
            open_media(url, settings, limits)
        monkeypatch.setattr(threading.Thread, "start", start)
        with open_media(url, settings, limits) as download:
            watching = [t for t in threading.enumerate() if t.name == "media-watchdog"]
            assert len(watching) == 1
            assert read_all(download) == BODY


def test_a_forked_child_starts_with_no_watchdog_of_its_parents() -> None:
    class Watched:
        def check(self) -> bool:
            return False

    watched = Watched()
    media._WATCHDOG.watch(watched)  # type: ignore[arg-type]
    try:
        child = os.fork()
        if child == 0:
            clean = False
            try:
                state = media._WATCHDOG
                free = state._lock.acquire(blocking=False)
                clean = free and not state._running and not state._downloads
            finally:
                os._exit(0 if clean else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        media._WATCHDOG.forget(watched)  # type: ignore[arg-type]
