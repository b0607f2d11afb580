"""Our V3 signature code agrees with Plivo's official SDK, the reference for how Plivo signs."""

from __future__ import annotations

import copy
import string
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plivo.utils.signature_v3 import (
    construct_get_url,
    construct_post_url,
    validate_v3_signature,
)
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from tests.fakeplivo import NONCE_HEADER, SIGNATURE_HEADER, FakePlivo
from webhook.signature import sign, signature_base, signature_matches

AUTH_TOKEN = "MjQ4ZDc5OTNiODVhNjFkZjNkZDEyNGI0ZDk4ZmYz"
OTHER_TOKEN = "ZmYzNGI0ZDk4MjQ4ZDc5OTNiODVhNjFkZjNkZDEy"
NONCE = "05429567804466091622"
CALLBACK_URL = "https://archive.example.com/plivo/recording"
RECORDING_CALLBACK: dict[str, list[str]] = {
    "api_id": ["c1a4e2f0-8b0e-11ee-b9d1-0242ac120002"],
    "record_url": [
        "https://media.plivo.com/v1/Account/MAFAKEAUTHID/Recording/93bc7c6a-3b2b-11e3.mp3"
    ],
    "recording_id": ["93bc7c6a-3b2b-11e3"],
    "conference_name": ["My Conf Room"],
    "recording_duration": ["345"],
    "recording_duration_ms": ["345100.00000"],
    "recording_start_ms": ["1700000000000.00000"],
    "recording_end_ms": ["1700000345100.00000"],
}
CAMEL_CALLBACK: dict[str, list[str]] = {
    "RecordUrl": ["https://media.plivo.com/v1/Account/MAFAKEAUTHID/Recording/93bc7c6a.mp3"],
    "RecordingID": ["93bc7c6a-3b2b-11e3"],
    "ConferenceName": ["My Conf Room"],
    "ConferenceUUID": ["2f1bc4a6-5b3c-4c8e-9d6a-0b1b6f0f7c11"],
    "ConferenceAction": ["record"],
}
NON_ASCII: dict[str, list[str]] = {
    "conference_name": ["会议室 Zoë"],
    "caller_name": ["Zoë"],
    "note": ["🎙️ recorded ✓"],
    "名前": ["値"],
}

SIGNER = FakePlivo(auth_token=AUTH_TOKEN)

Params = Mapping[str, Sequence[str]]


def sdk_accepts(
    method: str, url: str, params: Mapping[str, Any], nonce: str, header: str, token: str
) -> bool:
    """The official SDK's verdict, given a copy of the params (it mutates them on GET)."""
    return bool(
        validate_v3_signature(method, url, nonce, token, header, copy.deepcopy(dict(params)))
    )


def ours_accepts(
    method: str, url: str, params: Params, nonce: str, header: str, token: str
) -> bool:
    """Our verdict on the same request."""
    return signature_matches(header, token, method, url, params, nonce)


def sdk_base(method: str, url: str, params: Mapping[str, Any]) -> str:
    """The string the official SDK signs."""
    sdk_params = copy.deepcopy(dict(params))
    if method == "GET":
        return bytes(construct_get_url(url, sdk_params)).decode("utf-8")
    return bytes(construct_post_url(url, sdk_params)).decode("utf-8")


def plivo_signature(
    method: str, url: str, params: Mapping[str, Any], nonce: str = NONCE, token: str = AUTH_TOKEN
) -> str:
    """The signature Plivo sends, as the official SDK computes it."""
    return SIGNER.sign_request(method, url, params, nonce=nonce, auth_token=token)[SIGNATURE_HEADER]


SIGNED_REQUESTS = [
    pytest.param("POST", CALLBACK_URL, RECORDING_CALLBACK, id="post-record-api-callback"),
    pytest.param("POST", CALLBACK_URL, CAMEL_CALLBACK, id="post-conference-xml-callback"),
    pytest.param("POST", CALLBACK_URL, {}, id="post-without-params"),
    pytest.param(
        "POST", CALLBACK_URL + "?tenant=acme&b=2&a=1", RECORDING_CALLBACK, id="post-with-query"
    ),
    pytest.param("POST", CALLBACK_URL + "?tenant=acme", {}, id="post-query-without-body"),
    pytest.param("POST", CALLBACK_URL + "#rc=3&rp=all", RECORDING_CALLBACK, id="post-fragment"),
    pytest.param(
        "POST", "https://archive.example.com:8443/plivo/recording", RECORDING_CALLBACK, id="port"
    ),
    pytest.param("POST", "http://127.0.0.1:5000/plivo/re%20cording", RECORDING_CALLBACK, id="http"),
    pytest.param("POST", CALLBACK_URL, NON_ASCII, id="post-non-ascii"),
    pytest.param("POST", CALLBACK_URL, {"tag": ["b", "a", "c"], "id": ["1"]}, id="post-repeated"),
    pytest.param("POST", CALLBACK_URL, {"a": [""], "b": ["x"], "c": [""]}, id="post-empty-values"),
    pytest.param(
        "POST", CALLBACK_URL, {"q": ["a&b=c", "+", "100%", " x "]}, id="post-special-characters"
    ),
    pytest.param("GET", CALLBACK_URL, RECORDING_CALLBACK, id="get-params-apart"),
    pytest.param(
        "GET", f"{CALLBACK_URL}?{urlencode(RECORDING_CALLBACK, doseq=True)}", {}, id="get-in-url"
    ),
    pytest.param(
        "GET",
        f"{CALLBACK_URL}?{urlencode(RECORDING_CALLBACK, doseq=True)}",
        RECORDING_CALLBACK,
        id="get-in-url-and-params",
    ),
    pytest.param("GET", CALLBACK_URL + "?tenant=acme", RECORDING_CALLBACK, id="get-extra-query"),
    pytest.param("GET", CALLBACK_URL + "?a=1&a=0&empty=", {}, id="get-query-repeated-empty"),
    pytest.param("GET", CALLBACK_URL, {}, id="get-without-params"),
    pytest.param("GET", CALLBACK_URL, NON_ASCII, id="get-non-ascii-params"),
    pytest.param("GET", CALLBACK_URL, {"tag": ["b", "a"], "empty": [""]}, id="get-repeated"),
    pytest.param("GET", CALLBACK_URL + "?q=a%26b%3Dc&p=%2B+x", {}, id="get-escaped-query"),
]


@pytest.mark.parametrize(("method", "url", "params"), SIGNED_REQUESTS)
def test_signature_base_is_the_string_the_sdk_signs(method: str, url: str, params: Params) -> None:
    assert signature_base(method, url, params) == sdk_base(method, url, params)


@pytest.mark.parametrize(("method", "url", "params"), SIGNED_REQUESTS)
def test_sign_computes_the_signature_plivo_sends(method: str, url: str, params: Params) -> None:
    assert sign(AUTH_TOKEN, signature_base(method, url, params), NONCE) == plivo_signature(
        method, url, params
    )


@pytest.mark.parametrize(("method", "url", "params"), SIGNED_REQUESTS)
def test_plivo_signature_is_accepted_by_both(method: str, url: str, params: Params) -> None:
    header = plivo_signature(method, url, params)
    assert sdk_accepts(method, url, params, NONCE, header, AUTH_TOKEN)
    assert ours_accepts(method, url, params, NONCE, header, AUTH_TOKEN)


@pytest.mark.parametrize(
    "header_of",
    [
        pytest.param(lambda right, other: f"{right},{other}", id="right-first"),
        pytest.param(lambda right, other: f"{other},{right}", id="right-last"),
        pytest.param(lambda right, other: f"{other},{right},{other}", id="right-in-middle"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_any_signature_in_the_header_may_match(method: str, header_of: Any) -> None:
    right = plivo_signature(method, CALLBACK_URL, RECORDING_CALLBACK)
    other = plivo_signature(method, CALLBACK_URL, RECORDING_CALLBACK, token=OTHER_TOKEN)
    header = header_of(right, other)
    assert sdk_accepts(method, CALLBACK_URL, RECORDING_CALLBACK, NONCE, header, AUTH_TOKEN)
    assert ours_accepts(method, CALLBACK_URL, RECORDING_CALLBACK, NONCE, header, AUTH_TOKEN)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("", id="empty"),
        pytest.param(",", id="only-a-comma"),
        pytest.param("not-a-signature", id="garbage"),
        pytest.param("sig1,sig2", id="several-wrong"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_header_without_the_right_signature_is_refused(method: str, header: str) -> None:
    wrong = plivo_signature(method, CALLBACK_URL, RECORDING_CALLBACK, token=OTHER_TOKEN)
    for candidate in (header, f"{header},{wrong}"):
        assert not sdk_accepts(
            method, CALLBACK_URL, RECORDING_CALLBACK, NONCE, candidate, AUTH_TOKEN
        )
        assert not ours_accepts(
            method, CALLBACK_URL, RECORDING_CALLBACK, NONCE, candidate, AUTH_TOKEN
        )


def _with(params: Params, **changes: list[str]) -> dict[str, list[str]]:
    return {**{key: list(values) for key, values in params.items()}, **changes}


def _without(params: Params, key: str) -> dict[str, list[str]]:
    return {name: list(values) for name, values in params.items() if name != key}


# (method, url, params, nonce, token) as verified, for a request Plivo signed as
# ("POST" or "GET", CALLBACK_URL, RECORDING_CALLBACK, NONCE, AUTH_TOKEN).
FORGERIES = [
    pytest.param(CALLBACK_URL, RECORDING_CALLBACK, NONCE, OTHER_TOKEN, id="wrong-token"),
    pytest.param(CALLBACK_URL, RECORDING_CALLBACK, "05429567804466091623", AUTH_TOKEN, id="nonce"),
    pytest.param(
        CALLBACK_URL,
        _with(RECORDING_CALLBACK, recording_duration_ms=["1.00000"]),
        NONCE,
        AUTH_TOKEN,
        id="tampered-value",
    ),
    pytest.param(
        CALLBACK_URL,
        _with(RECORDING_CALLBACK, extra=["1"]),
        NONCE,
        AUTH_TOKEN,
        id="added-param",
    ),
    pytest.param(
        CALLBACK_URL,
        _without(RECORDING_CALLBACK, "record_url"),
        NONCE,
        AUTH_TOKEN,
        id="removed-param",
    ),
    pytest.param(
        CALLBACK_URL,
        _with(RECORDING_CALLBACK, conference_name=["My Conf Room", "Other"]),
        NONCE,
        AUTH_TOKEN,
        id="repeated-param",
    ),
    pytest.param(
        "http://archive.example.com/plivo/recording",
        RECORDING_CALLBACK,
        NONCE,
        AUTH_TOKEN,
        id="other-scheme",
    ),
    pytest.param(
        "https://archive.example.com:443/plivo/recording",
        RECORDING_CALLBACK,
        NONCE,
        AUTH_TOKEN,
        id="explicit-port",
    ),
    pytest.param(
        "https://archive.example.com:8443/plivo/recording",
        RECORDING_CALLBACK,
        NONCE,
        AUTH_TOKEN,
        id="other-port",
    ),
    pytest.param(
        "https://evil.example.com/plivo/recording",
        RECORDING_CALLBACK,
        NONCE,
        AUTH_TOKEN,
        id="other-host",
    ),
    pytest.param(CALLBACK_URL + "/", RECORDING_CALLBACK, NONCE, AUTH_TOKEN, id="trailing-slash"),
    pytest.param(CALLBACK_URL + "?x=1", RECORDING_CALLBACK, NONCE, AUTH_TOKEN, id="added-query"),
]


@pytest.mark.parametrize(("url", "params", "nonce", "token"), FORGERIES)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_forgery_is_refused_by_both(
    method: str, url: str, params: Params, nonce: str, token: str
) -> None:
    header = plivo_signature(method, CALLBACK_URL, RECORDING_CALLBACK)
    assert not sdk_accepts(method, url, params, nonce, header, token)
    assert not ours_accepts(method, url, params, nonce, header, token)


@pytest.mark.parametrize(("signed", "verified"), [("GET", "POST"), ("POST", "GET")])
def test_signature_for_another_method_is_refused(signed: str, verified: str) -> None:
    header = plivo_signature(signed, CALLBACK_URL, RECORDING_CALLBACK)
    assert not sdk_accepts(verified, CALLBACK_URL, RECORDING_CALLBACK, NONCE, header, AUTH_TOKEN)
    assert not ours_accepts(verified, CALLBACK_URL, RECORDING_CALLBACK, NONCE, header, AUTH_TOKEN)


# Inputs on which webhook.signature and the official Python SDK disagree. Each is strict: if the
# disagreement goes away, the test fails, so this list stays true. See the notes per case.
KNOWN_DISAGREEMENTS = [
    # The SDK parses the URL's query as bytes and turns each byte into a character (Latin-1), so
    # "Zo%C3%AB" becomes "ZoÃ«"; we (and plivo-go) decode UTF-8. Matters for GET callbacks whose
    # non-ASCII params are verified through the URL's query; passing them as params agrees.
    pytest.param("GET", CALLBACK_URL + "?conference_name=Zo%C3%AB", {}, id="non-ascii-url-query"),
    pytest.param(
        "POST", CALLBACK_URL + "?tenant=%E4%BC%9A", {"a": ["1"]}, id="non-ascii-post-url-query"
    ),
    # The SDK uses urlparse(), which cuts ";params" off the last path segment; we keep them.
    pytest.param("POST", CALLBACK_URL + ";v=1", {"a": ["1"]}, id="semicolon-in-path"),
    # A key with no value at all (never produced by a form or a query): the SDK still adds "?".
    pytest.param("POST", CALLBACK_URL, {"a": []}, id="key-without-values"),
]


@pytest.mark.xfail(strict=True, reason="known disagreement with the Python SDK, see comments")
@pytest.mark.parametrize(("method", "url", "params"), KNOWN_DISAGREEMENTS)
def test_known_disagreement_with_the_sdk(method: str, url: str, params: Params) -> None:
    assert signature_base(method, url, params) == sdk_base(method, url, params)


def test_flat_string_values_are_read_like_the_sdk_does() -> None:
    flat = {"recording_id": "93bc7c6a", "conference_name": "My Conf Room"}
    header = plivo_signature("POST", CALLBACK_URL, flat)
    assert sdk_accepts("POST", CALLBACK_URL, flat, NONCE, header, AUTH_TOKEN)
    assert ours_accepts("POST", CALLBACK_URL, flat, NONCE, header, AUTH_TOKEN)


# --- property: both implementations agree, on signed and on tampered requests -------------------

# No "%" in raw queries: "%ff" or "%C3%AB" decode to non-ASCII, a known disagreement (above).
RAW_QUERY_ALPHABET = "abcAB019=&+-_.~!*'(),:@/? "
# No ";" (the SDK drops ";params"), "?", "#" or "/" inside a path segment.
PATH_ALPHABET = string.ascii_letters + string.digits + "-._~!$&'()*+,=:@%"

any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
ascii_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8)
# A small alphabet so that keys often collide: between the URL's query and the params, and
# between "key+value" concatenations in a POST body.
small_key = st.text("abc_", min_size=1, max_size=2)
param_dicts = st.dictionaries(
    small_key | any_text.filter(bool), st.lists(any_text, min_size=1, max_size=3), max_size=5
)


@st.composite
def callback_urls(draw: st.DrawFn) -> str:
    """A URL Plivo might be told to call back: scheme, host, port, path, query, fragment."""
    scheme = draw(st.sampled_from(["http", "https"]))
    host = draw(st.sampled_from(["archive.example.com", "127.0.0.1", "[::1]", "Example.COM"]))
    port = draw(st.none() | st.integers(min_value=1, max_value=65535))
    netloc = host if port is None else f"{host}:{port}"
    segments = draw(st.lists(st.text(PATH_ALPHABET, max_size=6), max_size=3))
    path = "".join("/" + segment for segment in segments)
    query = draw(
        st.one_of(
            st.just(""),
            st.lists(st.tuples(small_key | ascii_text, ascii_text), max_size=4).map(urlencode),
            st.text(RAW_QUERY_ALPHABET, max_size=12),
        )
    )
    fragment = draw(st.sampled_from(["", "rc=3&rp=all"]))
    return urlunsplit((scheme, netloc, path, query, fragment))


nonces = st.one_of(
    st.text(string.digits, min_size=20, max_size=20), st.text(string.ascii_letters, max_size=24)
)
tokens = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)
methods = st.sampled_from(["GET", "POST"])


@settings(max_examples=200, deadline=None, database=None)
@given(method=methods, url=callback_urls(), params=param_dicts, nonce=nonces, token=tokens)
def test_property_plivo_signature_is_accepted_by_both(
    method: str, url: str, params: dict[str, list[str]], nonce: str, token: str
) -> None:
    header = plivo_signature(method, url, params, nonce=nonce, token=token)
    assert signature_base(method, url, params) == sdk_base(method, url, params)
    assert sdk_accepts(method, url, params, nonce, header, token)
    assert ours_accepts(method, url, params, nonce, header, token)


def _tampered(
    data: st.DataObject, method: str, url: str, params: dict[str, list[str]], nonce: str, token: str
) -> tuple[str, str, dict[str, list[str]], str, str]:
    """The same request with one thing changed, the way a forger or a buggy proxy would."""
    kind = data.draw(
        st.sampled_from(
            ["value", "add", "drop", "method", "scheme", "host", "query", "nonce", "token"]
        )
    )
    params = copy.deepcopy(params)
    parts = urlsplit(url)
    if kind == "value" and params:
        key = data.draw(st.sampled_from(sorted(params)))
        position = data.draw(st.integers(0, len(params[key]) - 1))
        params[key][position] += data.draw(any_text.filter(bool))
    elif kind == "add" or (kind in ("value", "drop") and not params):
        params[data.draw(small_key | any_text)] = data.draw(st.lists(any_text, min_size=1))
    elif kind == "drop":
        del params[data.draw(st.sampled_from(sorted(params)))]
    elif kind == "method":
        method = "POST" if method == "GET" else "GET"
    elif kind == "scheme":
        url = parts._replace(scheme="http" if parts.scheme == "https" else "https").geturl()
    elif kind == "host":
        url = parts._replace(netloc="evil.example.com").geturl()
    elif kind == "query":
        extra = urlencode({data.draw(small_key): data.draw(ascii_text)})
        url = parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra).geturl()
    elif kind == "nonce":
        nonce += data.draw(st.sampled_from(string.digits))
    else:
        token += data.draw(st.sampled_from(string.ascii_letters))
    return method, url, params, nonce, token


@settings(max_examples=200, deadline=None, database=None)
@given(
    method=methods,
    url=callback_urls(),
    params=param_dicts,
    nonce=nonces,
    token=tokens,
    data=st.data(),
)
def test_property_both_judge_tampered_requests_alike(
    method: str,
    url: str,
    params: dict[str, list[str]],
    nonce: str,
    token: str,
    data: st.DataObject,
) -> None:
    header = plivo_signature(method, url, params, nonce=nonce, token=token)
    forged = _tampered(data, method, url, params, nonce, token)
    forged_method, forged_url, forged_params, forged_nonce, forged_token = forged
    # Some changes sign the same string (POST bodies are "key"+"value" with no separator,
    # "a"+"bc" == "ab"+"c"): then both must accept, else both must refuse.
    expected = plivo_signature(*forged[:3], nonce=forged_nonce, token=forged_token) == header
    sdk = sdk_accepts(forged_method, forged_url, forged_params, forged_nonce, header, forged_token)
    ours = ours_accepts(
        forged_method, forged_url, forged_params, forged_nonce, header, forged_token
    )
    assert sdk == ours == expected


# --- the fake Plivo signs exactly as the SDK verifies ---------------------------------------------


@pytest.mark.parametrize(("method", "url", "params"), SIGNED_REQUESTS)
def test_fake_sign_request_is_accepted_by_the_sdk_validator(
    method: str, url: str, params: Params
) -> None:
    headers = SIGNER.sign_request(method, url, params)
    nonce = headers[NONCE_HEADER]
    assert len(nonce) == 20
    assert nonce.isdigit()
    assert validate_v3_signature(
        method, url, nonce, AUTH_TOKEN, headers[SIGNATURE_HEADER], copy.deepcopy(dict(params))
    )


def test_fake_sign_request_takes_single_values_and_leaves_params_alone() -> None:
    params: dict[str, Any] = {"recording_id": "93bc7c6a", "tag": ["b", "a"]}
    before = copy.deepcopy(params)
    headers = SIGNER.sign_request("GET", CALLBACK_URL + "?tenant=acme", params, nonce=NONCE)
    assert params == before
    assert validate_v3_signature(
        "GET", CALLBACK_URL + "?tenant=acme", NONCE, AUTH_TOKEN, headers[SIGNATURE_HEADER], params
    )
    as_lists = {"recording_id": ["93bc7c6a"], "tag": ["b", "a"]}
    assert headers[SIGNATURE_HEADER] == plivo_signature(
        "GET", CALLBACK_URL + "?tenant=acme", as_lists
    )


def test_fake_sign_request_uses_a_fresh_nonce_and_its_own_token() -> None:
    first = SIGNER.sign_request("POST", CALLBACK_URL, RECORDING_CALLBACK)
    second = SIGNER.sign_request("POST", CALLBACK_URL, RECORDING_CALLBACK)
    assert first[NONCE_HEADER] != second[NONCE_HEADER]
    assert first[SIGNATURE_HEADER] != second[SIGNATURE_HEADER]
    assert first[SIGNATURE_HEADER] == plivo_signature(
        "POST", CALLBACK_URL, RECORDING_CALLBACK, nonce=first[NONCE_HEADER]
    )


class CallbackReceiver:
    """A throwaway HTTP server that records the callbacks it receives and answers 200."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        self.received.append(
            {
                "method": request.method,
                "path": request.path,
                "query_string": request.query_string.decode("ascii"),
                "content_type": request.mimetype,
                "args": request.args.to_dict(flat=False),
                "form": request.form.to_dict(flat=False),
                "headers": dict(request.headers.items()),
            }
        )
        return Response("ok")(environ, start_response)


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    receiver = CallbackReceiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.thread.join()


PUBLIC_URL = "https://archive.example.com"


def test_fake_posts_a_signed_form_the_service_can_verify(receiver: CallbackReceiver) -> None:
    params = {**RECORDING_CALLBACK, **NON_ASCII}
    response = SIGNER.send_callback(
        receiver.url + "/plivo/recording", params, sign_url=PUBLIC_URL + "/plivo/recording"
    )
    assert response.status_code == 200
    (received,) = receiver.received
    assert received["method"] == "POST"
    assert received["content_type"] == "application/x-www-form-urlencoded"
    assert received["form"] == params
    headers = received["headers"]
    header, nonce = headers[SIGNATURE_HEADER], headers[NONCE_HEADER]
    public_url = PUBLIC_URL + received["path"]
    assert ours_accepts("POST", public_url, received["form"], nonce, header, AUTH_TOKEN)
    assert sdk_accepts("POST", public_url, received["form"], nonce, header, AUTH_TOKEN)
    # What the socket saw (http://127.0.0.1:port) is not what Plivo signed.
    socket_url = receiver.url + received["path"]
    assert not ours_accepts("POST", socket_url, received["form"], nonce, header, AUTH_TOKEN)


def test_fake_gets_a_signed_query_the_service_can_verify(receiver: CallbackReceiver) -> None:
    response = SIGNER.send_callback(
        receiver.url + "/plivo/recording",
        RECORDING_CALLBACK,
        method="GET",
        nonce=NONCE,
        sign_url=PUBLIC_URL + "/plivo/recording",
        extra_headers={"X-Request-Id": "test-1"},
    )
    assert response.status_code == 200
    (received,) = receiver.received
    assert received["method"] == "GET"
    assert received["args"] == RECORDING_CALLBACK
    assert received["headers"]["X-Request-Id"] == "test-1"
    header = received["headers"][SIGNATURE_HEADER]
    assert received["headers"][NONCE_HEADER] == NONCE
    path, query, args = received["path"], received["query_string"], received["args"]
    # Verified with the query in the URL, as params, or both: the same string is signed.
    for url, params in [
        (f"{PUBLIC_URL}{path}?{query}", {}),
        (f"{PUBLIC_URL}{path}", args),
        (f"{PUBLIC_URL}{path}?{query}", args),
    ]:
        assert ours_accepts("GET", url, params, NONCE, header, AUTH_TOKEN)
        assert sdk_accepts("GET", url, params, NONCE, header, AUTH_TOKEN)


def test_fake_callback_with_a_wrong_token_is_refused(receiver: CallbackReceiver) -> None:
    SIGNER.send_callback(receiver.url + "/cb", RECORDING_CALLBACK, auth_token=OTHER_TOKEN)
    (received,) = receiver.received
    header, nonce = received["headers"][SIGNATURE_HEADER], received["headers"][NONCE_HEADER]
    url = receiver.url + "/cb"
    assert not ours_accepts("POST", url, received["form"], nonce, header, AUTH_TOKEN)
    assert not sdk_accepts("POST", url, received["form"], nonce, header, AUTH_TOKEN)
    assert ours_accepts("POST", url, received["form"], nonce, header, OTHER_TOKEN)
