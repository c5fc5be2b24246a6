"""The search index: a search through it finds exactly what ILIKE finds, and reads less."""

from __future__ import annotations

import json
import random
import shlex
import time
from datetime import timedelta
from pathlib import Path

import pytest

from llmtap.recorder.reader import InProcessReader
from llmtap.recorder.record import Attempt, Call, new_id, utcnow
from llmtap.recorder.recorder import Recorder
from llmtap.recorder.search_index import SearchIndex, split_words
from llmtap.tui import query as q
from tuihelpers import BASE_TIME, DuckReader, make_reader
from waiting import wait_until

# Pieces of text where a word index is easy to get wrong: case, punctuation inside and around
# words, code points DuckDB lowers to ASCII (İ, the Kelvin sign), scripts without ASCII spaces,
# underscores and LIKE's wildcards, and words longer than the index stores.
PIECES = ["rate", "Limit", "日本語の文" * 20, "-", " ", ".", "\n", "İstanbul", "ı", "\u212a", "ΣΊΣΥΦΟΣ", "ς", "日本語の文", "é",
          "snake_case", "100%", "x" * 70, "y" * 64, "42", "Ab", "aB", "\t", "::", "\\", "\"", "'"]


def ilike_ids(reader: DuckReader, text: str) -> list[str]:
    like = "%" + q._like_escape(text) + "%"
    _, rows = reader.query("SELECT id FROM calls WHERE content ILIKE ? ESCAPE '\\' OR reasoning ILIKE ? ESCAPE '\\' "
                           "OR prompt ILIKE ? ESCAPE '\\' ORDER BY id DESC", [like, like, like])
    return [str(r[0]) for r in rows]


def search_ids(reader: DuckReader, schema: q.Schema, text: str) -> list[str]:
    flt = q.parse_filter(shlex.quote("text:" + text), schema)
    page = q.load_page(reader, schema, flt, None, (), limit=100_000)
    assert page is not None and page.exhausted
    return [str(r[page.columns.index("id")]) for r in page.rows]


def test_split_words_marks_which_edges_are_word_edges() -> None:
    assert split_words("rate-limit") == [("rate", False, True), ("limit", True, False)]
    assert split_words(" x ") == [("x", True, True)]
    assert split_words("日本語") == [("日本語", False, False)]
    assert split_words("--") == []


def test_indexed_search_finds_exactly_what_ilike_finds(tmp_path: Path) -> None:
    rnd = random.Random(7)
    reader = make_reader(tmp_path)

    def text() -> str | None:
        return None if rnd.random() < 0.15 else "".join(rnd.choice(PIECES) for _ in range(rnd.randint(1, 12)))

    bodies: list[str] = []
    ids: list[str] = []
    for i in range(240):
        content, reasoning, prompt = text(), text(), text()
        if i == 30:  # a word too long to store even in pieces, in one chunk only
            content = "Az" + "z" * 5000 + "b"
        bodies += [b for b in (content, reasoning, prompt) if b]
        ids.append(reader.insert(started_at=BASE_TIME + timedelta(seconds=i), content=content, reasoning=reasoning,
                                 prompt=prompt))
    index = SearchIndex(reader.con, chunk_calls=16)
    # The newest 40 stay unindexed, as calls written since the last chunk are. Chunks of 16
    # merge four at a time: calls 0-63, 64-127, 128-191 in three, 192-199 in one.
    assert index.build_all(below=ids[200]) == 200
    assert reader.query("SELECT level, count(*) FROM _search_chunks GROUP BY ALL ORDER BY 1")[1] == [(0, 1), (1, 3)]
    # A call rewritten inside a built chunk (a stream that ended after its chunk was built)
    # brings its words along; a chunk dropped from the index leaves a gap that is read.
    reader.con.execute("BEGIN TRANSACTION")
    reader.con.execute("UPDATE calls SET content = 'late zebra words' WHERE id = ?", [ids[5]])
    index.add_late([ids[5]])
    reader.con.execute("COMMIT")
    index.uncover([ids[100]])
    reader.con.execute("UPDATE calls SET content = 'gap okapi words' WHERE id = ?", [ids[100]])
    schema = q.load_schema(reader)
    assert schema.has_search_index

    queries = ["zebra", "okapi", "late zebra", "rate-limit", "İ", "i", "k", "K", "ΣΊ", "σ", "本語", "x" * 66,
               "y" * 64, "x" * 33 + "y", "x" * 40, "zq", "zzzb", "azzz", "zz" * 40, "日本語の文" * 8, "文日", "_", "%", "ab", "e", ". ", "\\", "nowhere", "rate nowhere", "limitless"]
    for _ in range(300):
        body = rnd.choice(bodies)
        a = rnd.randrange(len(body))
        cut = body[a:a + rnd.randint(1, 20)]
        queries.append(cut.upper() if rnd.random() < 0.3 else cut)
        queries.append(cut + rnd.choice(["q", "zz", " nothing"]))
    narrowed = 0
    for query in queries:
        if not query.strip("\n\t ") or "\x00" in query:
            continue  # shlex drops bare whitespace; an empty search is not a search
        expected = ilike_ids(reader, query)
        assert search_ids(reader, schema, query) == expected, f"search {query!r}"
        narrowed += q.index_clause(reader, schema, q.parse_filter(shlex.quote("text:" + query), schema)) is not None
    # The index was used, not bypassed: most of these searches read only part of the calls.
    assert narrowed > len(queries) // 3
    # A word no call has: only the unindexed calls, the gap (64-127) and the chunk with a word
    # too long for pieces (0-63) are read.
    clause = q.index_clause(reader, schema, q.parse_filter("nowhere", schema))
    assert clause is not None
    read = {str(r[0]) for r in reader.query(f"SELECT id FROM calls WHERE {clause[0]}", clause[1])[1]}
    assert read == {*ids[:128], *ids[200:]}
    reader.close()


def test_the_recorder_indexes_when_idle_but_not_past_a_call_in_progress(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "calls.duckdb", flush_interval_s=0.02, serve=False, index_chunk_calls=4)
    rec.start()
    reader = InProcessReader(rec)

    def call(content: str) -> Call:
        return Call(id=new_id(), started_at=utcnow(), method="POST", url="http://127.0.0.1:1/v1/chat/completions",
                    api="openai.chat", client="t", model_requested="m", stream=False, request_headers={},
                    request_body=b"{}")

    def end(c: Call, content: str) -> None:
        c.status, c.duration_ms, c.response_headers = 200, 5.0, {"content-type": "application/json"}
        c.response_body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                                   "finish_reason": "stop"}]}).encode()
        rec.call_finished(c.finished([Attempt(c.id, 1, "p", c.url, "m", utcnow(), 200, None, 5.0)]))

    def indexed() -> int:
        return int(reader.query("SELECT coalesce(sum(calls), 0) FROM _search_chunks")[1][0][0])

    try:
        for i in range(8):
            end(call(""), f"answer {i} about moles")
        wait_until(lambda: indexed() == 8, "two chunks of four calls")
        slow = call("")
        rec.call_started(slow.started())
        for i in range(8):
            end(call(""), f"later {i} about voles")
        time.sleep(0.2)  # ten writer rounds: nothing past the call in progress is indexed
        assert indexed() == 8
        end(slow, "slow answer about capybaras")
        wait_until(lambda: indexed() == 16, "the slow call and those after it, in whole chunks")
        wait_until(lambda: reader.query("SELECT level FROM _search_chunks")[1] == [(1,)], "the four chunks merged")
        schema = q.load_schema(reader)
        page = q.load_page(reader, schema, q.parse_filter("capybaras", schema), None, ())
        assert page is not None and [r[0] for r in page.rows] == [slow.id]
        # A word no call has reads only the one call after the chunk.
        clause = q.index_clause(reader, schema, q.parse_filter("wombats", schema))
        assert clause is not None
        assert len(reader.query(f"SELECT id FROM calls WHERE {clause[0]}", clause[1])[1]) == 1
    finally:
        rec.close()


def test_a_failure_to_index_a_late_call_never_costs_the_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "t.duckdb"
    # Ids with gaps between them: ids made in one process are consecutive (new_id is monotonic),
    # and a late id picked next to the first one took the second's, one run in 32.
    prefix = new_id()[:-1]
    reader = make_reader(tmp_path, [{"content": f"old {i}", "id": prefix + c} for i, c in enumerate("048")])
    SearchIndex(reader.con).build_all()
    reader.close()
    rec = Recorder(db, serve=False)
    rec.start()
    try:
        def broken(ids: object) -> None:
            raise RuntimeError("index bug")

        monkeypatch.setattr(rec.index, "add_late", broken)
        # A call whose id sorts inside the built chunk, as one imported from a spool would.
        late_id = prefix + "2"
        late = Call(id=late_id, started_at=utcnow(), method="POST", url="http://x/", api="other",
                    client="t", model_requested=None, stream=False, request_headers={}, request_body=b"")
        late.status, late.duration_ms, late.response_body = 200, 1.0, b"unparsed platypus"
        rec.call_finished(late.finished([]))
        rec.close()
    finally:
        rec.close()
    reader = DuckReader(db)
    schema = q.load_schema(reader)
    assert reader.query("SELECT count(*) FROM _search_chunks")[1][0][0] == 0  # the chunk left the index
    assert reader.query("SELECT count(*) FROM calls WHERE id = ?", [late.id])[1][0][0] == 1
    assert search_ids(reader, schema, "old") == ilike_ids(reader, "old")
    reader.close()
