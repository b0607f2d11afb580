"""Plivo's V3 callback signature, as its SDKs compute it (checked against the official one)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import parse_qsl, urlsplit, urlunsplit

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
