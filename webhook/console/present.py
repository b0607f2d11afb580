"""How the console shows values: times, durations, sizes, and transcript words highlighted."""

from __future__ import annotations

import datetime as dt
import re

from markupsafe import Markup, escape

TERM = re.compile(r'"([^"]*)"|(\S+)')


def when(epoch_ms: int | None) -> str:
    """Epoch milliseconds as a UTC date and time."""
    if epoch_ms is None:
        return "—"
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(ms: int | None) -> str:
    """Milliseconds as h:mm:ss or m:ss."""
    if ms is None:
        return "—"
    minutes, seconds = divmod(round(ms / 1000), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def size(count: int | None) -> str:
    """A byte count with its exact value and a readable unit."""
    if count is None:
        return "—"
    unit, value = "bytes", float(count)
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        unit, value = bigger, value / 1024
    return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit} ({count} bytes)"


def search_terms(q: str | None) -> list[str]:
    """The words and phrases a transcript search looks for (`OR` and `-excluded` words are not)."""
    terms = []
    for phrase, word in TERM.findall(q or ""):
        term = (phrase or word).strip()
        if term and term != "OR" and not term.startswith("-"):
            terms.append(term)
    return terms


def highlight(text: str, q: str | None) -> Markup:
    """`text`, escaped, with every searched word or phrase in <mark> (whole words, any case)."""
    terms = sorted(search_terms(q), key=len, reverse=True)
    if not terms:
        return escape(text)
    pattern = re.compile(
        r"(?<!\w)(" + "|".join(r"\s+".join(map(re.escape, t.split())) for t in terms) + r")(?!\w)",
        re.IGNORECASE,
    )
    out: list[str] = []
    last = 0
    for match in pattern.finditer(text):
        out.append(escape(text[last : match.start()]))
        out.append(Markup("<mark>%s</mark>") % match.group(0))
        last = match.end()
    out.append(escape(text[last:]))
    return Markup("").join(out)


def marked(snippet: str) -> Markup:
    """A search hit's extract, escaped, with the words the database matched (between « and »)
    in <mark>."""
    out: list[str] = []
    for n, part in enumerate(re.split(r"«(.*?)»", snippet)):
        out.append(Markup("<mark>%s</mark>") % part if n % 2 else escape(part))
    return Markup("").join(out)
