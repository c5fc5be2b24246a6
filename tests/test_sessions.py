"""Sessions rebuilt from traffic: the grouping on constructed shapes, then the traffic shapes of
real tools through the real proxy into a real DuckDB file, and `llmtap sessions` reading it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anthropic
import duckdb
import httpx
import openai
import pytest

from fakeprovider import FakeProvider, linger, ok, slow, status
from llmtap.addons.commands import _flush_lines, _print_line, format_call_line
from llmtap.cli import main as llmtap_main
from llmtap.dialects.shapes import Message, Part, Request, Response, ToolCall, ToolResult
from llmtap.recorder import extract as extract_module
from llmtap.recorder import sessions as grouping
from llmtap.recorder.record import Call
from llmtap.recorder.recorder import Recorder, _job, spool_path
from llmtap.recorder.sessions import (
    KEYS_PER_CLIENT,
    MAX_CLIENTS,
    QUOTES_PER_CLIENT,
    CallInfo,
    Grouper,
    Session,
    SessionStore,
)
from llmtap.recorder.workers import Helpers, extract_job
from proxyharness import RunningProxy
from waiting import wait_until

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
KEY = "sk-test-sessions-0123456789abcdef"


# -- the grouping, on constructed Requests and Responses ----------------------------------------
def user(text: str) -> Message:
    return Message("user", (Part("text", text=text),))


def system(text: str) -> Message:
    return Message("system", (Part("text", text=text),))


def said(text: str | None = None, *calls: ToolCall) -> Message:
    parts = ((Part("text", text=text),) if text else ()) + tuple(Part("tool_call", tool_call=c) for c in calls)
    return Message("assistant", parts)


def result(call_id: str, text: str) -> Message:
    return Message("tool", (Part("tool_result", tool_result=ToolResult(call_id, text)),))


class Run:
    """Calls of one client, a minute apart unless told otherwise."""

    def __init__(self, grouper: Grouper | None = None, client: str = "agent/1.0") -> None:
        self.g = grouper or Grouper()
        self.client = client
        self.n = 0
        self.at = T0

    def call(self, messages: list[Message], answer: Response | None = None, *, after: timedelta = timedelta(minutes=1),
             headers: dict[str, str] | None = None, ids: dict[str, str] | None = None,
             label: tuple[str, str] | None = None, client: str | None = None) -> tuple[str, Any]:
        self.n += 1
        self.at += after
        cid = f"C{self.n:03d}"
        link = self.g.add(CallInfo(id=cid, started_at=self.at, client=client or self.client, headers=headers or {},
                                   label=label, request=Request("openai.chat", messages=tuple(messages), ids=ids or {}),
                                   response=answer or Response("openai.chat", content=f"answer {self.n}"),
                                   duration_ms=1000))
        return cid, link


def answer(text: str | None = None, *calls: ToolCall, rid: str | None = None) -> Response:
    return Response("openai.chat", id=rid, content=text, tool_calls=calls)


def test_tool_loop_links_each_call_to_the_answer_whose_tool_call_it_answers() -> None:
    run = Run()
    c1 = ToolCall("call_a", "read", '{"path": "x"}')
    first, l1 = run.call([system("sys"), user("fix the bug")], answer(None, c1))
    c2 = ToolCall("call_b", "write", "{}")
    # The client resends the arguments re-serialised, and a new system prompt (a date in it).
    hist = [system("sys, now 12:01"), user("fix the bug"), said(None, ToolCall("call_a", "read", '{"path":"x"}')),
            result("call_a", "contents")]
    second, l2 = run.call(hist, answer(None, c2))
    third, l3 = run.call([*hist, said(None, c2), result("call_b", "ok")], answer("done"))
    fourth, l4 = run.call([*hist, said(None, c2), result("call_b", "ok"), said("done"), user("thanks, now tests")])
    assert (l1.link, l1.turn, l1.parent_call_id) == ("new", 1, None)
    assert (l2.link, l2.parent_call_id, l2.session_id) == ("tool_call:call_a", first, first)
    assert (l3.link, l3.parent_call_id) == ("tool_call:call_b", second)
    assert (l4.link, l4.parent_call_id, l4.turn, l4.session_id) == ("history", third, 4, first)


def test_a_session_is_titled_by_its_task_folded_to_one_line_however_it_is_spaced() -> None:
    run = Run()
    # Cline-like: the task wrapped in blank lines and indentation, pages long.
    spaced, _ = run.call([system("sys"), user("\n" * 300 + "  <task>\n\n\tFix   the failing\n\ntests " + "in src/ " * 400)])
    short, _ = run.call([user(" " * 200 + "hello\n\n  world")], client="other/1.0")
    titles = {sid: s.title for sid, s in run.g.dirty.items()}
    assert titles[spaced] == ("<task> Fix the failing tests " + "in src/ " * 40)[:grouping.TITLE_CHARS - 1] + "…"
    assert titles[short] == "hello world"


def test_two_tasks_interleaved_from_one_client_stay_apart() -> None:
    run = Run()
    a1, _ = run.call([system("same"), user("task A")], answer("A says 1"))
    b1, _ = run.call([system("same"), user("task B")], answer("B says 1"))
    _, la = run.call([system("same"), user("task A"), said("A says 1"), user("go on A")], answer("A says 2"))
    _, lb = run.call([system("same"), user("task B"), said("B says 1"), user("go on B")], answer("B says 2"))
    assert (la.session_id, la.link, la.parent_call_id) == (a1, "history", a1)
    assert (lb.session_id, lb.link, lb.parent_call_id) == (b1, "history", b1)


def test_two_tasks_with_the_same_answers_are_told_apart_by_their_history() -> None:
    # Two runs of one agent whose answers are word for word the same: only history tells them apart.
    run = Run()
    a1, _ = run.call([user("task A")], answer("same"))
    b1, _ = run.call([user("task B")], answer("same"))
    _, lb = run.call([user("task B"), said("same"), user("more")], answer("same"))
    _, la = run.call([user("task A"), said("same"), user("more")], answer("same"))
    assert (la.session_id, lb.session_id) == (a1, b1)


def test_compacted_history_continues_its_session() -> None:
    run = Run()
    first, _ = run.call([user("the task"), ], answer("step 1"))
    run.call([user("the task"), said("step 1"), user("next")], answer("step 2"))
    third, _ = run.call([user("the task"), said("step 1"), user("next"), said("step 2"), user("and next")],
                        answer("step 3"))
    # Cline-style truncation: the first message kept, the middle dropped, the last exchange kept.
    _, cut = run.call([user("the task"), user("and next"), said("step 3"), user("go")], answer("step 4"))
    assert (cut.session_id, cut.link, cut.parent_call_id) == (first, "history:compacted", third)
    # Claude Code-style: the history replaced by the summary the model wrote for it.
    summary = "The user asked for the task; steps 1 to 4 are done, tests are next."
    fifth, _ = run.call([user("the task"), user("go"), said("step 4"), user("summarise the conversation")],
                        answer(summary))
    _, after = run.call([user("This session continues from an earlier conversation, summarised:\n" + summary),
                         user("carry on")])
    assert (after.session_id, after.link, after.parent_call_id) == (first, "quote", fifth)


def test_an_idle_gap_ends_an_inferred_session_but_not_a_named_one() -> None:
    run = Run(Grouper(idle_s=1800))
    first, _ = run.call([user("task")], answer("one"))
    later, l2 = run.call([user("task"), said("one"), user("back")], after=timedelta(hours=2))
    assert (l2.session_id, l2.link, l2.parent_call_id) == (later, "idle", first)
    h = {"x-llmtap-session": "night-run"}
    n1, _ = run.call([user("a")], headers=h)
    _, n2 = run.call([user("unrelated")], headers=h, after=timedelta(days=1))
    assert (n2.session_id, n2.link, n2.parent_call_id) == (n1, "header:x-llmtap-session", n1)


def test_explicit_ids_beat_structure_and_responses_chain_by_previous_response_id() -> None:
    run = Run()
    a, _ = run.call([user("task")], answer("one"), headers={"x-claude-code-session-id": "s-1"})
    # Same conversation, another session id: the id the client sends wins.
    b, lb = run.call([user("task"), said("one"), user("more")], headers={"x-claude-code-session-id": "s-2"})
    assert (lb.session_id, lb.link) == (b, "header:x-claude-code-session-id")
    r1, _ = run.call([user("q")], answer("x", rid="resp_1"))
    _, lr = run.call([user("follow-up only")], ids={"previous_response_id": "resp_1"})
    assert (lr.session_id, lr.link, lr.parent_call_id) == (r1, "body:previous_response_id", r1)
    u1, _ = run.call([user("one thing")], ids={"metadata.user_id": "user_abc_session_1"})
    _, lu = run.call([user("another")], ids={"metadata.user_id": "user_abc_session_1"})
    assert (lu.session_id, lu.link) == (u1, "body:metadata.user_id")
    assert a != b


def test_a_research_pipeline_of_fresh_prompts_is_one_session_when_each_quotes_the_last() -> None:
    # Local Deep Research through LangChain: every call a fresh [system, user] prompt, no ids;
    # each step hands the previous answer on in its prompt.
    run = Run(client="python-requests/2.32")
    sysp = system("You are a research assistant.")
    q, _ = run.call([sysp, user("Generate 2 questions about tides")],
                    answer("1. What causes spring tides on the coast?\n2. Why are there two tides a day?"))
    _, l2 = run.call([sysp, user("Summarise the search results for: what causes spring tides on the coast\n...")],
                     answer("Spring tides happen when sun and moon align."))
    _, l3 = run.call([sysp, user("Findings so far:\nSpring tides happen when sun and moon align.\nWrite the report.")],
                     answer("Report"))
    other, l4 = run.call([sysp, user("An unrelated prompt from the same client")])
    assert (l2.session_id, l2.link, l2.parent_call_id) == (q, "quote", q)
    assert (l3.session_id, l3.link) == (q, "quote")
    assert (l4.session_id, l4.link) == (other, "new")


def test_memory_stays_bounded_by_the_lru() -> None:
    g = Grouper()
    run = Run(g)
    for i in range(MAX_CLIENTS + 10):
        run.call([user(f"task {i}")], client=f"client-{i}")
    assert len(g._clients) <= MAX_CLIENTS
    for i in range(KEYS_PER_CLIENT):
        run.call([user(f"t{i}")], answer(f"a{i}", ToolCall(f"id{i}", "f", "{}")), client="busy")
    assert len(g._clients.get("busy")) <= KEYS_PER_CLIENT
    # The newest are still matched.
    _, last = run.call([result(f"id{KEYS_PER_CLIENT - 1}", "r")], client="busy")
    assert last.link == f"tool_call:id{KEYS_PER_CLIENT - 1}"


def test_a_session_dropped_from_memory_before_its_row_is_written_still_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # More sessions touched than memory keeps, none written yet (no store): the first task's
    # next call still joins it, instead of starting a second session under the same evidence.
    monkeypatch.setattr(grouping, "MAX_SESSIONS", 4)
    run = Run(Grouper())
    first, _ = run.call([user("task A")], answer(None, ToolCall("call_a", "read", "{}")))
    for i in range(6):
        run.call([user(f"other task {i}")])
    _, later = run.call([user("task A"), said(None, ToolCall("call_a", "read", "{}")), result("call_a", "x")])
    assert (later.session_id, later.link, later.turn) == (first, "tool_call:call_a", 2)


def test_quotes_memory_stays_bounded_whatever_the_answers() -> None:
    g = Grouper()
    run = Run(g, client="writer")
    for i in range(QUOTES_PER_CLIENT // 100):
        run.call([user(f"t{i}")], answer(" ".join(f"w{i}x{j}" for j in range(300))))
    assert 0 < len(g._quotes.get("writer")) <= QUOTES_PER_CLIENT
    # The newest answers are still found when quoted.
    _, last = run.call([user("Findings: " + " ".join(f"w{i}x{j}" for j in range(20)))])
    assert last.link == "quote"


def _chat_call(cid: str, messages: list[dict], answer_text: str) -> Call:
    c = Call(id=cid, started_at=T0, method="POST", url="http://127.0.0.1:8081/openai/chat/completions",
             api="openai.chat", client="pipeline/1.0", request_body=json.dumps({"model": "m", "messages": messages}).encode())
    c.status, c.duration_ms = 200, 10.0
    c.response_headers = {"content-type": "application/json"}
    c.response_body = json.dumps({"id": f"r-{cid}", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": answer_text}, "finish_reason": "stop"}]}).encode()
    return c


def _links(read: list[tuple[Call, Any]]) -> list[tuple[str, str, str | None]]:
    """(session, link, parent) of each call in turn, linked through one SessionStore from its
    extraction, as the writer does."""
    store = SessionStore()
    links = []
    for call, ex in read:
        row: dict[str, Any] = {"client": call.client, "status": 200}
        store.link(call, row, ex.facts, ex.response_id, lambda t: t)
        links.append((row["session_id"], row["session_link"], row["parent_call_id"]))
    return links


def test_a_long_history_with_a_role_that_is_not_a_string_still_continues_its_session() -> None:
    # A broken client: a role that is a list, in a history long enough to be cut to the few
    # messages grouping reads. Telling the roles apart must not give up on the body.
    history: list[dict[str, Any]] = [{"role": "user", "content": "the task"}]
    for i in range(5):
        history += [{"role": "assistant", "content": f"step {i}"}, {"role": ["odd"], "content": f"more {i}"}]
    first = _chat_call("C1", history, "step 5")
    second = _chat_call("C2", history + [{"role": "assistant", "content": "step 5"}, {"role": "user", "content": "go on"}],
                        "step 6")
    links = _links([(call, extract_job(_job(call, 1 << 20, True))) for call in (first, second)])
    assert links == [("C1", "new", None), ("C1", "history", "C1")]


# Chat Completions bodies are read for grouping straight from their JSON where they have the
# shapes agents send, and by the dialect otherwise; a session must not care which.
_CONTENTS: list[Any] = [None, "", "  plain text  ", "x" * 600, 7, {"type": "text", "text": "a dict"},
                        [{"type": "text", "text": "one"}, {"type": "text", "text": " two "}], ["bare", "strings"],
                        [{"type": "input_text", "text": "in"}, {"text": "untyped"}], [{"type": "text", "text": ""}],
                        [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "see"}],
                        [{"type": "refusal", "refusal": "no"}], [{"type": "thinking", "thinking": "hm"}],
                        [{"type": "text", "text": 5}], [{"type": ["odd"], "text": "t"}], [{"type": "mystery"}], [3], []]
_CALLS: list[Any] = [None, [], "not a list", [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                     [{"id": "call_b", "function": {"name": "g", "arguments": {"k": 1}}}, {"id": "call_c", "function": {}}],
                     [{"function": {"name": "h", "arguments": "{\"z\": 1, \"a\": 2}"}}], [{"id": ""}], ["x"]]


def _odd_message(rnd: Any) -> Any:
    if rnd.random() < 0.03:
        return rnd.choice(["a string", 4, None, ["list"]])
    role = rnd.choice(["system", "developer", "user", "user", "assistant", "assistant", "tool", "tool", "function",
                       "model", None, 5])
    msg: dict[str, Any] = {"content": rnd.choice(_CONTENTS)}
    if role is not None:
        msg["role"] = role
    if rnd.random() < 0.5:
        msg["tool_calls"] = rnd.choice(_CALLS)
    if role in ("tool", "function") or rnd.random() < 0.1:
        msg["tool_call_id"] = rnd.choice(["call_a", "call_b", "", None, 9])
    if rnd.random() < 0.06:  # Responses items, and types no format has
        msg["type"] = rnd.choice(["function_call", "function_call_output", "reasoning", "message", ["odd"], None])
    if rnd.random() < 0.02:
        msg["role"] = rnd.choice([["user"], {"r": 1}, True])
    for key, values in (("reasoning_content", ["why", "", 3]), ("name", ["n", 2]),
                        ("function_call", [{"name": "f", "arguments": "{}"}, "odd"])):
        if rnd.random() < 0.08:
            msg[key] = rnd.choice(values)
    return msg


def _trimmed_by_every_role(doc: dict) -> tuple[dict, int | None, int | None]:
    """sessions.trimmed as first written, reading every item's role: what the one that reads
    from both ends must give."""
    items = doc["messages"]
    roles = [grouping._role_of(it) for it in items]
    last = next((i for i in range(len(roles) - 1, -1, -1) if roles[i] == "assistant"), None)
    while last and roles[last - 1] == "assistant":
        last -= 1
    if len(items) <= grouping.KEEP_WHOLE:
        return doc, last, len(items)
    talk = [i for i, r in enumerate(roles) if r not in (None, "system")]
    keep = set(talk[:1]) | set(next(([i] for i in talk if roles[i] == "user"), []))
    ends = [i for i in talk if roles[i] == "assistant" and (i + 1 == len(items) or roles[i + 1] != "assistant")]
    for end in ends[-2:] if roles[-1] == "assistant" else ends[-1:]:
        start = end
        while start > 0 and roles[start - 1] == "assistant":
            start -= 1
        keep.update(range(max(start - 1, 0), end + 1))
    keep.update(range(ends[-1] + 1, len(items)) if ends else talk)
    return {**doc, "messages": [items[i] for i in sorted(keep)]}, last, len(items)


def test_a_chat_body_read_straight_from_json_groups_as_the_dialect_reads_it() -> None:
    rnd = random.Random(1515)
    answers = [None, Response(api="openai.chat", content="the answer"),
               Response(api="openai.chat", content="", tool_calls=(ToolCall("call_n", "f", "{}"),)),
               Response(api="openai.chat", reasoning="only thought"),
               Response(api="openai.chat", content="both", tool_calls=(ToolCall(None, "f", '{"b": 1, "a": 2}'),)),
               Response(api="openai.chat")]
    for answer in answers[1:]:  # the answer is read without building its message
        message = answer.message()
        assert grouping._answer_turn(answer) == (grouping._turn_of(message) if message.parts else None)
    direct = looped = 0
    for _case in range(3000):
        messages = [_odd_message(rnd) for _ in range(rnd.randint(0, 24))]
        answer = rnd.choice(answers)
        if rnd.random() < 0.3:  # an agent's tool loop: read from its last turn alone (_tool_loop_facts)
            answer = rnd.choice([answers[2], answers[2], answer])
            if rnd.random() < 0.8:
                messages.insert(0, {"role": "user", "content": rnd.choice(["the task", "the task", *_CONTENTS])})
            messages += [{"role": "assistant", "content": None, "tool_calls": _CALLS[3]},
                         {"role": "tool", "tool_call_id": "call_a", "content": rnd.choice(["r", " x ", None])},
                         *(_odd_message(rnd) for _ in range(rnd.choice([0, 0, 1, 2])))]
        doc: dict[str, Any] = {"model": "m", "messages": messages}
        for key, value in (("user", "u-1"), ("prompt_cache_key", ""), ("safety_identifier", "s-1")):
            if rnd.random() < 0.3:
                doc[key] = value
        assert grouping.trimmed(doc) == _trimmed_by_every_role(doc), messages
        request, answer_at, history_len = grouping.read_request("openai.chat", doc)
        assert grouping.read_facts("openai.chat", doc, answer) == grouping.facts_of(request, answer, answer_at,
                                                                                  history_len), messages
        direct += grouping._chat_turns(grouping.trimmed(doc)[0]["messages"]) is not None
        looped += grouping._tool_loop_facts(messages, (), answer) is not None
    # The direct readings must be what agents' bodies get, else this compares the dialect with itself.
    assert 100 < direct < 2900
    assert 60 < looped < direct
    loop = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "task"}]},
            {"role": "assistant", "content": None, "tool_calls": _CALLS[3]},
            {"role": "tool", "tool_call_id": "call_a", "content": "result"}]
    assert grouping._chat_turns(loop) is not None


def test_a_screenshot_in_the_middle_of_a_task_does_not_split_its_session() -> None:
    # The turn that carries an image is read by the dialect, the turns around it straight from
    # the JSON: the fingerprints each leaves must meet the other's.
    shot = {"role": "user", "content": [{"type": "text", "text": "here is the page"},
                                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
    turns = [{"role": "user", "content": "fix the layout"}]
    calls = []
    for i, extra in enumerate([None, shot, {"role": "user", "content": "now the footer"}]):
        if extra is not None:
            turns = turns + [{"role": "assistant", "content": f"done step {i - 1}"}, extra]
        calls.append(_chat_call(f"S{i}", turns, f"done step {i}"))
    links = _links([(call, extract_job(_job(call, 1 << 20, True))) for call in calls])
    assert links == [("S0", "new", None), ("S0", "history", "S0"), ("S0", "history", "S1")]


def test_fingerprints_from_a_helper_process_meet_those_made_in_the_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under load the request is read and hashed in an extraction helper (another interpreter,
    # with a hash seed of its own); at other times in the writer. A session must go on across
    # the switch: conversation growth and quotes are matched by hashes made on both sides.
    monkeypatch.setenv("PYTHONHASHSEED", "4242")  # the helper's str hashes surely differ from ours
    task = "Write a report on tides"
    first = _chat_call("C1", [{"role": "user", "content": task}], "Step one: the moon pulls the sea toward it")
    second = _chat_call("C2", [{"role": "user", "content": task},
                               {"role": "assistant", "content": "Step one: the moon pulls the sea toward it"},
                               {"role": "user", "content": "go on"}], "Step two: the sun adds its own pull twice a month")
    third = _chat_call("C3", [{"role": "user", "content": "Findings so far: the sun adds its own pull twice a month. "
                                                          "Write the report."}], "Report")
    helpers = Helpers(1, None)
    try:
        in_helper = next(helpers.map([_job(c, 1 << 20, True) for c in (second, third)], 8))
        assert helpers.running == 1
    finally:
        helpers.stop()
    in_writer = extract_job(_job(first, 1 << 20, True))  # this process: the writer's own path
    links = _links([(first, in_writer), (second, in_helper[0]), (third, in_helper[1])])
    assert in_helper[0].facts is not None and in_helper[1].facts is not None
    assert links == [("C1", "new", None), ("C1", "history", "C1"), ("C1", "quote", "C2")]


def test_session_rows_the_database_refuses_cost_no_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Sessions are written in their calls' transaction (one commit a batch); a session row
    # DuckDB refuses (here a NOT NULL column left empty) must not take the calls with it.
    real_row = Session.row
    monkeypatch.setattr(Session, "row", lambda self: (self.id, None, *real_row(self)[2:]))
    db = tmp_path / "refused.duckdb"
    rec = Recorder(db, serve=False)
    rec.start()
    try:
        for i in range(3):
            rec.call_finished(_chat_call(f"R{i}", [{"role": "user", "content": f"task {i}"}], "ok").finished())
        wait_until(lambda: rec.written == 3, what="three calls written")
        monkeypatch.setattr(Session, "row", real_row)  # the next batch's sessions go in again
        rec.call_finished(_chat_call("R9", [{"role": "user", "content": "task 9"}], "fine").finished())
        wait_until(lambda: rec.written == 4, what="the fourth call written")
    finally:
        rec.close()
    assert not spool_path(db).exists()
    with duckdb.connect(str(db), read_only=True) as con:
        calls = con.execute("SELECT id, session_id FROM calls ORDER BY id").fetchall()
        sessions = con.execute("SELECT id FROM sessions").fetchall()
    assert calls == [("R0", "R0"), ("R1", "R1"), ("R2", "R2"), ("R9", "R9")]
    assert sessions == [("R9",)]


def _responses_call(cid: str, request: dict, response_id: str) -> Call:
    c = _chat_call(cid, [], "")
    c.api, c.url = "openai.responses", "http://127.0.0.1:8081/openai/responses"
    c.request_body = json.dumps({"model": "m", **request}).encode()
    c.response_body = json.dumps({"id": response_id, "object": "response", "status": "completed", "model": "m",
                                  "output": [{"type": "message", "role": "assistant",
                                              "content": [{"type": "output_text", "text": "hi"}]}]}).encode()
    return c


def test_an_inferred_session_goes_on_after_the_recorder_restarts(tmp_path: Path) -> None:
    # `llmtap run` stopped and started again in the middle of an agent's task: the grouper's
    # memory is read back from the record, so the next turn still continues the task.
    db = tmp_path / "restart.duckdb"
    task = [{"role": "user", "content": "Refactor the parser"}]
    now = datetime.now(timezone.utc)
    first = _chat_call("A1", task, "I split the tokenizer out of the parser")
    other = _chat_call("B1", [{"role": "user", "content": "Something else"}], "Unrelated answer")
    named = _chat_call("N1", [{"role": "user", "content": "a job"}], "step")
    named.session_headers = {"x-llmtap-session": "job-7"}
    chained = _responses_call("P1", {"input": "start"}, "resp_abc123")
    for c in (first, other, named, chained):
        c.started_at = now - timedelta(minutes=2)
    for run in range(2):
        rec = Recorder(db, serve=False, helpers=0)
        rec.start()
        try:
            if run == 0:
                for c in (first, other, named, chained):
                    rec.call_finished(c.finished())
            else:
                nxt = _chat_call("A2", [*task, {"role": "assistant", "content": "I split the tokenizer out of the parser"},
                                        {"role": "user", "content": "now the tests"}], "done")
                again = _chat_call("N2", [{"role": "user", "content": "the job's next step"}], "ok")
                again.session_headers = {"x-llmtap-session": "job-7"}
                follow = _responses_call("P2", {"input": "go on", "previous_response_id": "resp_abc123"}, "resp_def")
                for c in (nxt, again, follow):
                    c.started_at = now
                    rec.call_finished(c.finished())
            want = 4 if run == 0 else 3
            wait_until(lambda r=rec, n=want: r.written == n, what="the calls written")
        finally:
            rec.close()
    assert not spool_path(db).exists()  # the sessions read from the store cost no batch
    with duckdb.connect(str(db), read_only=True) as con:
        got = dict(con.execute("SELECT id, (session_id, session_link, parent_call_id, turn) FROM calls "
                               "WHERE id IN ('A2', 'N2', 'P2')").fetchall())
        calls = dict(con.execute("SELECT id, calls FROM sessions WHERE id IN ('A1', 'N1')").fetchall())
    assert got == {"A2": ("A1", "history", "A1", 2), "N2": ("N1", "header:x-llmtap-session", "N1", 2),
                   "P2": ("P1", "body:previous_response_id", "P1", 2)}
    assert calls == {"A1": 2, "N1": 2}


# -- real traffic through the proxy into DuckDB ---------------------------------------------------
def _rules(tmp_path: Path, fake: FakeProvider) -> Path:
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent(f"""\
        providers:
          fake: {{base_url: "{fake.url}/v1", api: openai}}
          claude: {{base_url: "{fake.url}", api: anthropic}}
        routes:
          - name: intercepted
            match: {{model: "gpt-4o-mini", host: api.openai.com}}
            targets: [{{provider: fake}}]
        """))
    return rules


class Recorded:
    def __init__(self, tmp_path: Path, confdir: Path, fake: FakeProvider) -> None:
        self.db = tmp_path / "llmtap.duckdb"
        self.recorder = Recorder(self.db)
        self.proxy = RunningProxy(_rules(tmp_path, fake), confdir, sink=self.recorder)

    def __enter__(self) -> Recorded:
        self.recorder.start()
        try:
            self.proxy.__enter__()
        except BaseException:
            self.recorder.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.proxy.stop()
        finally:
            self.recorder.close()

    def rows(self, sql: str) -> list[tuple]:
        with duckdb.connect(str(self.db), read_only=True) as con:
            return con.execute(sql).fetchall()


@pytest.fixture
def rec(tmp_path: Path, confdir: Path, fake: FakeProvider):
    with Recorded(tmp_path, confdir, fake) as r:
        yield r


TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                           "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                                                          "required": ["path"]}}},
         {"type": "function", "function": {"name": "attempt_completion", "description": "Finish",
                                           "parameters": {"type": "object", "properties": {"result": {"type": "string"}},
                                                          "required": ["result"]}}}]


def _cline_loop(client: openai.OpenAI, task: str, turns: int, stream: bool = True) -> list[dict]:
    """What Cline does through an OpenAI-compatible provider: a system prompt with the time in
    it, the whole history each turn, each tool's result answering its tool call; no ids."""
    history: list[dict] = [{"role": "user", "content": f"<task>\n{task}\n</task>"}]
    for turn in range(turns):
        messages = [{"role": "system", "content": f"You are Cline. Turn {turn}."}, *history]
        if stream:
            text, calls = "", {}
            for ev in client.chat.completions.create(model="qwen-coder", messages=messages, tools=TOOLS, stream=True,
                                                    stream_options={"include_usage": True}):
                d = ev.choices[0].delta if ev.choices else None
                if d is None:
                    continue
                text += d.content or ""
                for tc in d.tool_calls or []:
                    got = calls.setdefault(tc.index, {"id": tc.id, "type": "function",
                                                      "function": {"name": tc.function.name, "arguments": ""}})
                    got["function"]["arguments"] += tc.function.arguments or ""
            msg: dict = {"role": "assistant", "content": text or None}
            if calls:
                msg["tool_calls"] = list(calls.values())
        else:
            m = client.chat.completions.create(model="qwen-coder", messages=messages, tools=TOOLS).choices[0].message
            msg = {"role": "assistant", "content": m.content,
                   **({"tool_calls": [tc.model_dump() for tc in m.tool_calls]} if m.tool_calls else {})}
        history.append(msg)
        for tc in msg.get("tool_calls") or []:
            history.append({"role": "tool", "tool_call_id": tc["id"], "content": f"result of {tc['function']['name']}"})
        if not msg.get("tool_calls"):
            history.append({"role": "user", "content": "thanks; one more thing"})
    return history


def test_cline_style_tool_loop_through_the_gateway_is_one_session(rec: Recorded, fake: FakeProvider) -> None:
    # Long enough that the recorder reads each request cut to its first and last messages.
    fake.script(*[ok(tool="read_file", tool_args={"path": f"f{i}.py"}) for i in range(8)], ok(tool=False), ok(tool=False))
    client = openai.OpenAI(base_url=f"{rec.proxy.gateway_url}/fake", api_key=KEY, max_retries=0)
    _cline_loop(client, "Fix the failing test", 10)
    rec.recorder.close()
    calls = rec.rows("SELECT id, session_id, session_link, parent_call_id, turn, tool_calls FROM calls ORDER BY id")
    ids = [c[0] for c in calls]
    tool_ids = [json.loads(c[5])[0]["id"] if c[5] else None for c in calls]
    assert [c[1] for c in calls] == [ids[0]] * 10
    assert [(c[2], c[3], c[4]) for c in calls] == [("new", None, 1)] + [
        (f"tool_call:{tool_ids[i]}", ids[i], i + 2) for i in range(8)] + [("history", ids[8], 10)]
    (s,) = rec.rows("SELECT id, source, client, title, calls, failed, errors, input_tokens, output_tokens, "
                    "started_at <= ended_at FROM sessions")
    assert s[:7] == (ids[0], "new", calls and s[2], "<task> Fix the failing test </task>", 10, False, 0)
    assert s[2].startswith("OpenAI/Python") and s[9]
    assert (s[7], s[8]) == rec.rows("SELECT sum(input_tokens), sum(output_tokens) FROM calls")[0] and s[7] > 0


def test_an_sdk_that_hangs_up_on_done_has_a_whole_answer_but_one_that_leaves_mid_stream_failed(
        rec: Recorded, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The openai SDK stops reading at `[DONE]` and closes the connection; a provider that is slow
    to end its body (held here for a minute) is hung up on. The client had the whole answer: the
    call and its session did not fail. A client gone before the answer's end did fail."""
    fake.script(linger(60, tool=False))
    client = openai.OpenAI(base_url=f"{rec.proxy.gateway_url}/fake", api_key=KEY, max_retries=0)
    got = "".join(ev.choices[0].delta.content or "" for ev in client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], stream=True) if ev.choices)
    fake.wait_disconnects(1, timeout=30)  # the client hung up before the provider's end of body
    assert fake.requests[0].disconnected and got
    fake.script(slow(0.2, chunks=200))
    with httpx.stream("POST", f"{rec.proxy.gateway_url}/fake/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {KEY}"},
                      json={"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "other"}]}) as r:
        next(r.iter_raw())
    fake.wait_disconnects(2, timeout=30)
    rec.recorder.close()
    rows = rec.rows("SELECT content, error, complete, notes, session_id FROM calls ORDER BY id")
    assert [r[:3] for r in rows] == [(got, None, True), (rows[1][0], "client disconnected", False)]
    assert "the client closed its connection after the answer's end" in rows[0][3]
    # Neither answer failed upstream: the attempts say so (an OTLP attempt span is not an error).
    assert rec.rows("SELECT status, error FROM attempts ORDER BY call_id") == [(200, None), (200, None)]
    assert rec.rows("SELECT id, calls, errors, failed FROM sessions ORDER BY id") == [
        (rows[0][4], 1, 0, False), (rows[1][4], 1, 1, True)]
    # `llmtap run`'s call lines say the same as the record.
    ended = [call for call, _ in sorted(rec.proxy.lines, key=lambda line: line[0].id)]
    whole, cut = (format_call_line(call) for call in ended)
    assert "!" not in whole and "hung up after the answer's end" in whole, whole
    assert cut.endswith("! client disconnected"), cut
    # As `llmtap run` prints them: the answers are read off the calling thread (the proxy's event
    # loop), and a flood of hang-ups still prints every line, the first ones judged.
    readers: list[str] = []
    real_extract = extract_module.extract
    monkeypatch.setattr(extract_module, "extract",
                        lambda *a, **k: readers.append(threading.current_thread().name) or real_extract(*a, **k))
    for call in ended * 20:
        _print_line(call)
    _flush_lines()
    printed = capsys.readouterr().out.splitlines()
    unjudged = format_call_line(ended[0], judge_hangup=False)  # a hang-up past the waiting ones
    assert len(printed) == 40 and whole in printed and cut in printed and set(printed) <= {whole, cut, unjudged}
    assert readers and threading.current_thread().name not in readers


def test_anthropic_sdk_with_a_session_header_groups_unrelated_conversations(rec: Recorded, fake: FakeProvider) -> None:
    client = anthropic.Anthropic(base_url=f"{rec.proxy.gateway_url}/claude", api_key=KEY, max_retries=0,
                                 default_headers={"x-llmtap-session": "nightly-review"})
    for prompt in ("review a.py", "review b.py", "write the summary"):
        client.messages.create(model="claude-sonnet", max_tokens=64, messages=[{"role": "user", "content": prompt}])
    plain = anthropic.Anthropic(base_url=f"{rec.proxy.gateway_url}/claude", api_key=KEY, max_retries=0)
    plain.messages.create(model="claude-sonnet", max_tokens=64, messages=[{"role": "user", "content": "other"}])
    rec.recorder.close()
    calls = rec.rows("SELECT id, session_id, session_link, parent_call_id FROM calls ORDER BY id")
    first = calls[0][0]
    assert [c[1:] for c in calls[:3]] == [(first, "header:x-llmtap-session", None),
                                          (first, "header:x-llmtap-session", calls[0][0]),
                                          (first, "header:x-llmtap-session", calls[1][0])]
    assert calls[3][1:] == (calls[3][0], "new", None)
    assert rec.rows("SELECT key, calls, title FROM sessions ORDER BY id") == [
        ("header:x-llmtap-session=nightly-review", 3, "review a.py"), (None, 1, "other")]


def test_langchain_like_research_run_and_its_failed_call(rec: Recorded, fake: FakeProvider,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Four calls of the openai SDK with one system prompt and no ids, each quoting the step
    before (as Local Deep Research does); the last one fails: the research failed."""
    client = openai.OpenAI(base_url=f"{rec.proxy.gateway_url}/fake", api_key=KEY, max_retries=0)
    sysp = {"role": "system", "content": "You are a meticulous research assistant."}
    answers = ["1. What drives ocean tides around the world?\n2. How large are spring tides compared with neap tides?",
               "The Moon's gravity drives ocean tides, with help from the Sun.",
               "Spring tides are about twenty percent larger than average tides."]
    prompts = ["Generate two research questions about tides.",
               "Search results for: What drives ocean tides around the world?\n[1] ...\nSummarise them.",
               "Search results for: How large are spring tides compared with neap tides?\n[1] ...\nSummarise them.",
               f"Findings:\n{answers[1]}\n{answers[2]}\nWrite the final report."]
    fake.script(ok(), ok(), ok(), status(500))
    for i, prompt in enumerate(prompts):
        if i < len(answers):
            fake.reply_text = answers[i]
        try:
            client.chat.completions.create(model="gpt-4o", messages=[sysp, {"role": "user", "content": prompt}])
        except openai.InternalServerError:
            assert i == 3
    # One more, unrelated research from the same client: a session of its own, not failed.
    fake.reply_text = "Unrelated."
    client.chat.completions.create(model="gpt-4o", messages=[sysp, {"role": "user", "content": "Questions on bees?"}])
    rec.recorder.close()
    calls = rec.rows("SELECT id, session_id, session_link, parent_call_id, status FROM calls ORDER BY id")
    first = calls[0][0]
    assert [c[1:4] for c in calls[:4]] == [(first, "new", None), (first, "quote", first), (first, "quote", first),
                                           (first, "quote", calls[1][0])]
    assert calls[3][4] == 500 and calls[4][1:3] == (calls[4][0], "new")
    assert rec.rows("SELECT calls, errors, failed FROM sessions ORDER BY id") == [(4, 1, True), (1, 0, False)]
    # The command line: the share of failed sessions per client, and --failed.
    assert llmtap_main(["sessions", "--db", str(rec.db), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["id"] for s in listed] == [calls[4][0], first]  # newest first
    assert {"id", "source", "client", "title", "started_at", "ended_at", "calls", "failed", "input_tokens",
            "output_tokens", "cost_usd"} <= set(listed[0])
    assert llmtap_main(["sessions", "--db", str(rec.db), "--failed", "--json"]) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)] == [first]
    assert llmtap_main(["sessions", "--db", str(rec.db)]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 sessions failed (50%)" in out
    assert llmtap_main(["sessions", "--db", str(rec.db), first]) == 0
    timeline = capsys.readouterr().out
    assert "Generate two research questions" in timeline and "500" in timeline and "quote" in timeline
    # The failed call reported no usage: its tokens are unknown, not 0/0.
    tokens = rec.rows("SELECT input_tokens, output_tokens FROM calls ORDER BY id")
    row_500 = next(line for line in timeline.splitlines() if "│    500 │" in line)
    assert tokens[3] == (None, None) and "-/-" in row_500 and "0/0" not in timeline, timeline
    assert f"{tokens[0][0]}/{tokens[0][1]}" in timeline


def test_two_interleaved_cline_tasks_and_a_compacted_history(rec: Recorded, fake: FakeProvider) -> None:
    client = openai.OpenAI(base_url=f"{rec.proxy.gateway_url}/fake", api_key=KEY, max_retries=0)
    fake.script(*[ok(tool=False)] * 12)
    sysp = {"role": "system", "content": "You are Cline."}
    hist = {"A": [{"role": "user", "content": "task A: rename the module"}],
            "B": [{"role": "user", "content": "task B: write the docs"}]}
    for turn in range(5):  # long enough that requests are read cut to their first and last messages
        for task in ("A", "B"):
            fake.reply_text = f"{task} step {turn}"  # distinct answers, as real ones are
            m = client.chat.completions.create(model="m", messages=[sysp, *hist[task]]).choices[0].message
            hist[task] += [{"role": "assistant", "content": m.content}, {"role": "user", "content": f"next {turn}"}]
    # Task A's history outgrew the context: the middle is dropped, the first message and the last exchange kept.
    fake.reply_text = "A after compaction"
    client.chat.completions.create(model="m", messages=[sysp, hist["A"][0], *hist["A"][-3:]])
    rec.recorder.close()
    calls = rec.rows("SELECT id, session_id, session_link, parent_call_id FROM calls ORDER BY id")
    a, b = calls[0][0], calls[1][0]
    assert [c[1] for c in calls] == [a, b] * 5 + [a]
    assert [c[2] for c in calls] == ["new", "new"] + ["history"] * 8 + ["history:compacted"]
    assert [c[3] for c in calls[2:10]] == [c[0] for c in calls[:8]] and calls[10][3] == calls[8][0]
    assert rec.rows("SELECT count(*) FROM sessions") == [(2,)]


def test_gateway_path_prefix_labels_a_session_and_is_not_routed(rec: Recorded, fake: FakeProvider) -> None:
    client = openai.OpenAI(base_url=f"{rec.proxy.gateway_url}/s/my%20run/fake", api_key=KEY, max_retries=0)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "one"}])
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "two"}])
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"] * 2
    rec.recorder.close()
    calls = rec.rows("SELECT session_id, session_link FROM calls ORDER BY id")
    assert [c[1] for c in calls] == ["label:path", "label:path"] and calls[0][0] == calls[1][0]
    assert rec.rows("SELECT key, calls FROM sessions") == [("label=my run", 2)]


def test_wrap_session_labels_every_call_of_the_wrapped_command(rec: Recorded, fake: FakeProvider,
                                                               confdir: Path, tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    # No base URL, no header: the SDK goes to api.openai.com through HTTPS_PROXY, as a user's
    # script would; two unrelated prompts, a fresh client (so a fresh connection) for each.
    script.write_text(textwrap.dedent("""\
        import openai
        for prompt in ("first", "second"):
            openai.OpenAI(api_key="sk-wrapped-0123456789", max_retries=0).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
        """))
    env = {k: v for k, v in __import__("os").environ.items() if not k.lower().endswith("_proxy")}
    r = subprocess.run([sys.executable, "-m", "llmtap", "wrap", "--session", "deploy-42", "--proxy",
                        rec.proxy.proxy_url.removeprefix("http://"), "--confdir", str(confdir), "--",
                        sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    rec.recorder.close()
    calls = rec.rows("SELECT session_id, session_link, url FROM calls ORDER BY id")
    assert [c[1:] for c in calls] == [("label:wrap", "https://api.openai.com/v1/chat/completions")] * 2
    assert calls[0][0] == calls[1][0]
    assert rec.rows("SELECT key, calls, title FROM sessions") == [("label=deploy-42", 2, "first")]


def test_sessions_read_through_the_running_proxy(rec: Recorded, fake: FakeProvider,
                                                 capsys: pytest.CaptureFixture) -> None:
    client = openai.OpenAI(base_url=f"{rec.proxy.gateway_url}/fake", api_key=KEY, max_retries=0,
                           default_headers={"x-llmtap-session": "live"})
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "while running"}])
    # Committed within the flush interval (the recorder says so after the commit); the command
    # reads through the recorder's endpoint, as the file is held.
    seq, finished = 0, False
    while not finished:
        seq, events = rec.recorder.hub.events_after(seq, 10)
        assert events, "the call was not committed"
        finished = any(e["kind"] == "finished" for e in events)
    assert llmtap_main(["sessions", "--db", str(rec.db), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["title"] for s in listed] == ["while running"]
    assert llmtap_main(["sessions", "--db", str(rec.db), "--client", "nobody*", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


# -- the UI's sessions view --------------------------------------------------------------------
def _recorded_tool_loop(db: Path) -> list[str]:
    """A three-call tool loop recorded by the real Recorder; the last call fails with a 500."""
    from llmtap.recorder.record import Call, new_id, utcnow

    rec = Recorder(db, serve=False, helpers=0)
    rec.start()
    msgs: list[dict] = [{"role": "user", "content": "fix the flaky test"}]
    ids = []
    try:
        for turn in range(3):
            tool = {"id": f"call_t{turn}", "type": "function", "function": {"name": "run_tests", "arguments": "{}"}}
            answer = {"role": "assistant", "content": None, "tool_calls": [tool]}
            failed = turn == 2
            c = Call(id=new_id(), started_at=utcnow(), method="POST", url="http://127.0.0.1:8081/x/v1/chat/completions",
                     api="openai.chat", client="cline/3", status=500 if failed else 200, duration_ms=10.0,
                     request_body=json.dumps({"model": "m", "messages": msgs}).encode(),
                     response_headers={"content-type": "application/json"},
                     response_body=json.dumps({"error": {"message": "boom"}} if failed else {
                         "choices": [{"message": answer, "finish_reason": "tool_calls"}]}).encode())
            rec.call_finished(c.finished())
            ids.append(c.id)
            msgs = [*msgs, answer, {"role": "tool", "tool_call_id": tool["id"], "content": "1 failed"}]
            # Each call is grouped when it is committed, and the next one answers its tool call.
            seq, done = rec.hub.seq, False
            while not done:
                seq, events = rec.hub.events_after(seq, 10)
                assert events, "not committed"
                done = any(e["kind"] == "finished" and e["id"] == c.id for e in events) or any(
                    e["kind"] == "finished" for e in events)
    finally:
        rec.close()
    return ids


async def test_ui_sessions_view_shows_the_tree_and_the_failed_call(tmp_path: Path) -> None:
    from textual.widgets import DataTable, Static, Tree

    from llmtap.tui.app import CallsScreen, LlmtapApp
    from llmtap.tui.sessions import SessionScreen, SessionsScreen
    from tuihelpers import DuckReader

    ids = _recorded_tool_loop(tmp_path / "ui.duckdb")
    reader = DuckReader(tmp_path / "ui.duckdb")
    app = LlmtapApp(reader)

    async def until(cond: Any, what: str) -> None:
        for _ in range(500):
            if cond():
                return
            await pilot.pause(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    async with app.run_test(size=(160, 45)) as pilot:
        await until(lambda: app.calls.pages_loaded > 0 and app.calls.table.row_count == 3, "the calls")
        await pilot.press("S")
        await until(lambda: isinstance(app.screen, SessionsScreen), "the sessions list")
        listing = app.screen.query_one("#sessions", DataTable)
        await until(lambda: listing.row_count == 1, "one session")
        assert "1 sessions, 1 failed (100%)" in str(app.screen.query_one("#sessions-summary", Static).render())
        await pilot.press("enter")
        await until(lambda: isinstance(app.screen, SessionScreen) and app.screen.calls, "the session")
        tree = app.screen.query_one("#session-tree", Tree)
        first = tree.root.children
        assert [n.data for n in first] == [ids[0]]  # the calls hang under the call each continues
        assert [n.data for n in first[0].children] == [ids[1]]
        assert [n.data for n in first[0].children[0].children] == [ids[2]]
        assert "tool_call:call_t0" in str(first[0].children[0].label)
        await until(lambda: tree.cursor_node is not None and tree.cursor_node.data == ids[2], "the failed call")
        assert any(s.style and "red" in str(s.style) for s in tree.cursor_node.label.spans)
        assert "FAILED" in str(app.screen.query_one("#session-summary", Static).render())
        await pilot.press("escape", "escape")
        assert isinstance(app.screen, CallsScreen)
        # From a call, J jumps to its session.
        await pilot.press("J")
        await until(lambda: isinstance(app.screen, SessionScreen) and app.screen.session, "its session")
        assert app.screen.session is not None and app.screen.session["id"] == ids[0]
    reader.close()


def test_responses_api_chains_by_previous_response_id(rec: Recorded, fake: FakeProvider) -> None:
    client = openai.OpenAI(base_url=f"{rec.proxy.gateway_url}/fake", api_key=KEY, max_retries=0)
    first = client.responses.create(model="gpt-4o", input="Name a prime number.")
    # The follow-up sends only the new message: the id is the one thing tying it to the first.
    client.responses.create(model="gpt-4o", input="And another one?", previous_response_id=first.id)
    client.responses.create(model="gpt-4o", input="Unrelated question.")
    rec.recorder.close()
    calls = rec.rows("SELECT id, session_id, session_link, parent_call_id FROM calls ORDER BY id")
    assert calls[1][1:] == (calls[0][0], "body:previous_response_id", calls[0][0])
    assert calls[2][1:] == (calls[2][0], "new", None)


def test_headers_that_are_not_utf8_cost_no_record(rec: Recorded, fake: FakeProvider) -> None:
    # An HTTP parser lets these bytes through; DuckDB takes only UTF-8 text.
    with httpx.Client(timeout=30) as client:
        r = client.post(f"{rec.proxy.gateway_url}/fake/chat/completions",
                        headers={"x-llmtap-session": b"night\xff", "user-agent": b"agent/1.0\x9b"},
                        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
    rec.recorder.close()
    assert not rec.db.with_name(rec.db.name + ".spool.jsonl").exists()
    (call,) = rec.rows("SELECT session_id, session_link FROM calls")
    assert call[1] == "header:x-llmtap-session"
    assert rec.rows("SELECT key FROM sessions") == [("header:x-llmtap-session=night\ufffd",)]
