"""Full-text search over transcripts: one query syntax, PostgreSQL's text search in production
and SQLite's FTS5 on a laptop, giving the same answers.

The syntax is the one people know from web search (and PostgreSQL's websearch_to_tsquery):
words (all must occur), "a phrase" (words in that order), OR between alternatives, -word or
-"a phrase" to exclude. It is parsed here once and written out for each database, rather than
left to each database's own parser, so that both read a query the same way.

Words are runs of letters and digits, lower-cased, accents kept (café is not cafe), no stemming
(returns is not return): PostgreSQL's 'simple' configuration and FTS5's unicode61 tokenizer with
remove_diacritics 0 split and fold text alike, so a word found on one is found on the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, ColumnElement, Select, bindparam, func, literal_column, select, text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler

from webhook.errors import BadParameter
from webhook.models import Transcript

MAX_TERMS = 32
# Highlight marks around matched words in a snippet: plain characters, safe in any page or CSV.
START_MARK, STOP_MARK, ELLIPSIS = "«", "»", "…"
SNIPPET_WORDS = 16
# PostgreSQL takes snippets from this many characters, starting WINDOW_BEFORE before a match.
WINDOW, WINDOW_BEFORE = 400, 120
FTS_TABLE = "transcripts_fts"
# Made by migration 0009 outside the models: SQLite's FTS5 table (with its shadow tables, all
# named transcripts_fts*), PostgreSQL's generated tsvector column and its GIN index.
PG_COLUMN = "search_vector"
PG_INDEX = "ix_transcripts_text_fts"


def is_search_structure(name: str | None) -> bool:
    """Whether a schema object is one of the search structures the models do not declare."""
    return bool(name) and (str(name).startswith(FTS_TABLE) or name in (PG_INDEX, PG_COLUMN))


TERM = re.compile(r'(-?)(?:"([^"]*)"?|(\S+))')
WORD = re.compile(r"[^\W_]+")
SIMPLE: ColumnElement[Any] = literal_column("'simple'::regconfig")


@dataclass(frozen=True)
class Term:
    """A word or phrase (its words joined by single spaces), perhaps excluded."""

    words: str
    excluded: bool = False


@dataclass(frozen=True)
class TextQuery:
    """A parsed `q`: alternatives (OR) of terms that must all hold (AND)."""

    alternatives: tuple[tuple[Term, ...], ...]


def parse_query(raw: str) -> TextQuery:
    """`q` as words, "phrases", OR and -exclusions; 400 naming `q` when it finds nothing."""
    alternatives: list[list[Term]] = [[]]
    count = 0
    for match in TERM.finditer(raw):
        minus, phrase, word = match.groups()
        if phrase is None and not minus and word.upper() == "OR":
            if alternatives[-1]:
                alternatives.append([])
            continue
        words = WORD.findall((phrase if phrase is not None else word).lower())
        if not words:
            continue  # punctuation alone matches no word
        alternatives[-1].append(Term(" ".join(words), excluded=bool(minus)))
        count += 1
    if count > MAX_TERMS:
        raise BadParameter("q", f"q may hold at most {MAX_TERMS} words or phrases")
    groups = tuple(tuple(group) for group in alternatives if group)
    if not groups:
        raise BadParameter("q", "q holds no word to search for")
    for group in groups:
        if all(term.excluded for term in group):
            raise BadParameter(
                "q", "q needs a word to search for besides the excluded ones (-word)"
            )
    return TextQuery(groups)


# --- PostgreSQL -------------------------------------------------------------------------------


def _pg_tsquery(query: TextQuery) -> ColumnElement[Any]:
    """The query as a tsquery built from phraseto_tsquery of each term (one lexeme per word)."""
    alternatives = []
    for group in query.alternatives:
        combined: ColumnElement[Any] | None = None
        for term in group:
            single = func.phraseto_tsquery(SIMPLE, bindparam(None, term.words))
            if term.excluded:
                single = func.tsquery_not(single)
            combined = single if combined is None else func.tsquery_and(combined, single)
        assert combined is not None
        alternatives.append(combined)
    result = alternatives[0]
    for alternative in alternatives[1:]:
        result = func.tsquery_or(result, alternative)
    return result


def pg_vector() -> ColumnElement[Any]:
    """The stored to_tsvector('simple', text) that migration 0009's GIN index covers."""
    return literal_column(f"transcripts.{PG_COLUMN}")


def _pg_window(query: TextQuery) -> ColumnElement[Any]:
    """The part of a transcript a snippet is taken from: WINDOW characters from a little before
    the first place a searched phrase (or its first word) occurs.

    ts_headline parses the whole text it is given, some 2 ms for a 5 000-character transcript:
    on a page of 50 hits that would be most of the request. Finding the place is a plain string
    search; the window may start mid-word, and ts_headline still marks only whole words.
    """
    lowered = func.lower(Transcript.text)
    needles = {
        needle
        for group in query.alternatives
        for term in group
        if not term.excluded
        for needle in (term.words, term.words.split(" ")[0])
    }
    positions = [func.nullif(func.strpos(lowered, bindparam(None, n)), 0) for n in sorted(needles)]
    first = func.coalesce(func.least(*positions), 1)
    start = func.greatest(first - WINDOW_BEFORE, 1)
    return func.substr(Transcript.text, start, WINDOW)


# --- SQLite FTS5 ------------------------------------------------------------------------------


def fts5_expression(query: TextQuery) -> str:
    """The query in FTS5's syntax, every term a quoted phrase, precedence made explicit."""
    alternatives = []
    for group in query.alternatives:
        wanted = [f'"{t.words}"' for t in group if not t.excluded]
        expression = "(" + " AND ".join(wanted) + ")"
        for term in group:
            if term.excluded:
                expression = f'({expression} NOT "{term.words}")'
        alternatives.append(expression)
    return " OR ".join(alternatives)


class Matches(ColumnElement[bool]):
    """`transcripts` rows whose text matches the query, written for the database at hand."""

    inherit_cache = False
    type = Boolean()

    def __init__(self, query: TextQuery) -> None:
        self.query = query


@compiles(Matches, "postgresql")
def _matches_postgresql(element: Matches, compiler: SQLCompiler, **kw: Any) -> str:
    condition = pg_vector().op("@@")(_pg_tsquery(element.query))
    return compiler.process(condition, **kw)


@compiles(Matches)
def _matches_sqlite(element: Matches, compiler: SQLCompiler, **kw: Any) -> str:
    fts: Select[Any] = select(literal_column("rowid")).select_from(text(FTS_TABLE))
    found = fts.where(
        literal_column(FTS_TABLE).op("MATCH")(bindparam(None, fts5_expression(element.query)))
    )
    return compiler.process(Transcript.id.in_(found.scalar_subquery()), **kw)


def matching_recordings(query: TextQuery) -> Any:
    """The recording ids whose transcript matches (a subquery for `recording_id IN (…)`)."""
    return select(Transcript.recording_id).where(Matches(query))


def snippets(session: Session, query: TextQuery, recording_ids: list[str]) -> dict[str, str]:
    """A short extract of each matching transcript with the matched words marked « »."""
    if not recording_ids:
        return {}
    if session.get_bind().dialect.name == "postgresql":
        options = (
            f"StartSel={START_MARK}, StopSel={STOP_MARK}, MaxWords={SNIPPET_WORDS}, "
            f'MinWords=5, MaxFragments=2, FragmentDelimiter=" {ELLIPSIS} "'
        )
        rows = session.execute(
            select(
                Transcript.recording_id,
                func.ts_headline(SIMPLE, _pg_window(query), _pg_tsquery(query), options),
            ).where(Transcript.recording_id.in_(recording_ids))
        )
    else:
        rows = session.execute(
            text(
                "SELECT t.recording_id, snippet(transcripts_fts, 0, :start, :stop, :ellipsis, "
                ":words) FROM transcripts_fts JOIN transcripts t ON t.id = transcripts_fts.rowid "
                "WHERE transcripts_fts MATCH :expression AND t.recording_id IN :ids"
            ).bindparams(bindparam("ids", expanding=True)),
            {
                "start": START_MARK,
                "stop": STOP_MARK,
                "ellipsis": ELLIPSIS,
                "words": SNIPPET_WORDS,
                "expression": fts5_expression(query),
                "ids": recording_ids,
            },
        )
    return {recording_id: snippet for recording_id, snippet in rows}
