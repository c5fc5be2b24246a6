"""A word index over `content`, `reasoning` and `prompt`, so a free-text search can skip most calls.

A search matching nothing used to read every body in the file (~0.9 s on a million calls). The
index records, per chunk of consecutive calls (by id), the set of words their content,
reasoning and prompt (the text parts of the request, see extract.prompt_text) contain: `_search_chunks` holds each chunk's id range, `_search_terms` its words. A
search first asks which chunks hold words that its text needs, then reads the bodies of those
chunks only, plus every call no chunk covers. The exact test (what ILIKE would match) still
decides; the index only rules calls out, so it can make a search faster, never wrong.

A word is a run of characters other than ASCII punctuation, spaces and controls, after DuckDB's
lower(): `rate-limit` gives `rate` and `limit`; text in other scripts stays in long runs, which
are stored in overlapping pieces (see MAX_TERM).

Chunks are built by the recorder's writer thread while it has little else to do, CHUNK_CALLS
calls at a time (see Recorder._run); calls newer than the last chunk are always read. A call
written after its chunk was built (a long stream, a spool import) adds its words to that chunk
in the same transaction that writes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb

from llmtap.recorder.schema import transaction

CHUNK_CALLS = 4096
# Once MERGE_FANIN neighbouring chunks of one level exist they are merged into one of the next
# level, up to MAX_LEVEL (4096 * 4^2 = 65,536 calls): a common word is then stored once per
# merged chunk instead of once per built one. On a million calls with a 50k-word vocabulary that
# cut the rows a search scans from 12.7M to about 1M; the price is that a rare word found in an
# old chunk reads all of that chunk's calls (~70 ms for 65k).
MERGE_FANIN = 4
MAX_LEVEL = 2
# Words up to MAX_TERM characters are stored whole. A longer one (a base64 blob, a sentence in a
# script without ASCII spaces) is stored as '' plus pieces: its last MAX_TERM characters, and
# MAX_TERM characters from every PIECE_STEP-th one, so any part of it up to PIECE_STEP + 1
# characters long, and any start or end up to MAX_TERM long, lies whole in a piece. Past
# MAX_PIECED characters it is stored as '*' alone, which every search reads.
MAX_TERM = 64
PIECE_STEP = 32
MAX_PIECED = 4096
# Every ASCII character that is not a letter, a digit or the space: each is turned into a space
# before the text is split on spaces (translate + string_split was ~1.7x faster than a regex
# split). NUL is left out: it is a word character on both sides, consistently. No word contains
# a separator, so the markers '' and '*' never collide with one.
SEPARATORS = "".join(chr(c) for c in range(1, 128) if not chr(c).isalnum() and c != 32)


def _words_sql(where: str) -> str:
    """(id, term) for every word of the calls `where` selects; the translate pair comes first
    in the parameters."""
    return f"""
        WITH words AS (
            SELECT id, unnest(string_split(translate(lower(
                       coalesce(content, '') || ' ' || coalesce(reasoning, '') || ' ' || coalesce(prompt, '')), ?, ?),
                       ' ')) AS w
            FROM calls WHERE {where})
        SELECT id, w AS term FROM words WHERE w <> '' AND length(w) <= {MAX_TERM}
        UNION ALL
        SELECT id, unnest(CASE WHEN length(w) > {MAX_PIECED} THEN ['*']
                               ELSE list_concat(['', substr(w, length(w) - {MAX_TERM - 1})],
                                                list_transform(range(0, length(w), {PIECE_STEP}),
                                                               lambda s: substr(w, s + 1, {MAX_TERM}))) END) AS term
        FROM words WHERE length(w) > {MAX_TERM}
    """


_TRANSLATE = [SEPARATORS, " " * len(SEPARATORS)]


def split_words(text: str) -> list[tuple[str, bool, bool]]:
    """The runs of word characters in `text`, each with whether a separator bounds it on the
    left and on the right *within text*. A run bounded on a side is a word's edge there in any
    body that contains text; an unbounded side may continue into more word characters."""
    runs: list[tuple[str, bool, bool]] = []
    start: int | None = None
    for i, ch in enumerate(text + " "):
        sep = ch == " " or ch in SEPARATORS
        if not sep and start is None:
            start = i
        elif sep and start is not None:
            runs.append((text[start:i], start > 0, i < len(text)))
            start = None
    return runs


class SearchIndex:
    """The writer thread's handle on the index; every method runs on the writer's connection,
    inside the caller's transaction where it has one."""

    def __init__(self, con: duckdb.DuckDBPyConnection, *, chunk_calls: int = CHUNK_CALLS,
                 max_level: int = MAX_LEVEL) -> None:
        """`chunk_calls` calls make a chunk of level 0; merged chunks go up to `max_level`."""
        self.con = con
        self.chunk_calls = chunk_calls
        self.max_level = max_level
        # Numbers of dropped chunks may still label words (uncover leaves them): never reuse one.
        row = con.execute("SELECT greatest((SELECT coalesce(max(chunk), 0) FROM _search_chunks), "
                          "(SELECT coalesce(max(chunk), 0) FROM _search_terms)), "
                          "(SELECT coalesce(max(last_id), '') FROM _search_chunks)").fetchone()
        self.last_chunk: int = int(row[0]) if row else 0
        # Calls with ids up to here belong to a chunk (or to a gap the UI reads anyway).
        self.covered_to: str = str(row[1]) if row else ""

    def add_late(self, ids: Sequence[str]) -> None:
        """Words of calls just written whose ids fall in chunks already built; call it in the
        transaction that wrote them, so no committed call is ever missing from its chunk."""
        late = [i for i in ids if i <= self.covered_to]
        if not late:
            return
        self.con.execute(
            f"""INSERT INTO _search_terms
                SELECT DISTINCT c.chunk, x.term FROM ({_words_sql('id IN (SELECT unnest(?))')}) x
                JOIN _search_chunks c ON x.id > c.after_id AND x.id <= c.last_id""",
            [*_TRANSLATE, late])

    def uncover(self, ids: Sequence[str]) -> None:
        """Drop the chunks these calls fall in (when their words could not be added): a search
        reads every call outside the chunks, so they are found again, the slow way."""
        self.con.execute("DELETE FROM _search_chunks WHERE EXISTS "
                         "(SELECT 1 FROM unnest(?) u(i) WHERE u.i > after_id AND u.i <= last_id)", [list(ids)])

    def build_next(self, below: str | None = None, min_calls: int | None = None) -> int:
        """Index the next `chunk_calls` calls after the last chunk, only ids < `below` (the oldest
        call still in progress: its words are not known yet); nothing when fewer than
        `min_calls` (default: a whole chunk) are waiting. Returns the number of calls indexed.
        Its own transaction."""
        con = self.con
        size = self.chunk_calls
        bound, params = ("id > ? AND id < ?", [self.covered_to, below]) if below else ("id > ?", [self.covered_to])
        row = con.execute(f"SELECT count(*) FROM (SELECT 1 FROM calls WHERE {bound} LIMIT ?)",
                          [*params, size]).fetchone()
        n = int(row[0]) if row else 0
        needed = size if min_calls is None else max(1, min(min_calls, size))
        if n < needed:
            return 0
        last = con.execute(f"SELECT id FROM calls WHERE {bound} ORDER BY id LIMIT 1 OFFSET ?",
                           [*params, n - 1]).fetchone()
        if last is None:  # the table shrank under us: try again next time
            return 0
        chunk, last_id = self.last_chunk + 1, str(last[0])
        with transaction(con):
            con.execute(f"INSERT INTO _search_terms SELECT DISTINCT ?, term FROM ({_words_sql('id > ? AND id <= ?')})",
                        [chunk, *_TRANSLATE, self.covered_to, last_id])
            con.execute("INSERT INTO _search_chunks VALUES (?, ?, ?, ?, 0, now())", [chunk, self.covered_to, last_id, n])
        self.last_chunk, self.covered_to = chunk, last_id
        return n

    def merge_next(self) -> bool:
        """Merge the oldest MERGE_FANIN neighbouring chunks of one level below `max_level` into one;
        False when there are none. Its own transaction."""
        con = self.con
        rows = con.execute("SELECT chunk, after_id, last_id, level FROM _search_chunks WHERE level < ? "
                           "ORDER BY after_id", [self.max_level]).fetchall()
        group: list[tuple] = []
        for row in rows:
            if group and (row[3] != group[-1][3] or row[1] != group[-1][2]):
                group = []  # another level, or a gap: start again here
            group.append(row)
            if len(group) == MERGE_FANIN:
                break
        else:
            return False
        olds = [g[0] for g in group]
        chunk = self.last_chunk + 1
        with transaction(con):
            con.execute("INSERT INTO _search_terms SELECT DISTINCT ?, term FROM _search_terms "
                        "WHERE chunk IN (SELECT unnest(?))", [chunk, olds])
            con.execute("INSERT INTO _search_chunks SELECT ?, min(after_id), max(last_id), sum(calls), ?, now() "
                        "FROM _search_chunks WHERE chunk IN (SELECT unnest(?))", [chunk, group[0][3] + 1, olds])
            con.execute("DELETE FROM _search_terms WHERE chunk IN (SELECT unnest(?))", [olds])
            con.execute("DELETE FROM _search_chunks WHERE chunk IN (SELECT unnest(?))", [olds])
        self.last_chunk = chunk
        return True

    def step(self, below: str | None = None, min_calls: int | None = None) -> bool:
        """One unit of index work: a merge if one is due, else the next chunk. False when
        there was nothing to do."""
        return self.merge_next() or bool(self.build_next(below, min_calls))

    def build_all(self, below: str | None = None) -> int:
        """Index every call, merges included (the benchmark DB generator; tests). Returns the
        calls indexed."""
        while self.step(below, min_calls=1):
            pass
        row = self.con.execute("SELECT coalesce(sum(calls), 0) FROM _search_chunks").fetchone()
        return int(row[0]) if row else 0
