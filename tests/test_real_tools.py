"""The real tools llmtap's users run, through llmtap, against the fake provider.

Cline's CLI (npm `cline`) completing a task with one tool call through the gateway and through
`llmtap wrap`, the npm `openai` SDK under `llmtap wrap -- node` (Node 20's fetch ignores
HTTPS_PROXY without llmtap's preload), and simonw's `llm` CLI through the gateway. Each test
asserts what a user would look for in the DuckDB file afterwards.

The npm tools are installed by `scripts/install_tools.sh` (the README's test command runs it);
when they are missing the first test installs them itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from fakeprovider import FakeProvider, ok
from llmtap.recorder.recorder import Recorder
from proxyharness import RunningProxy

REPO = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("LLMTAP_TEST_TOOLS", REPO / ".tools"))
NODE_DIR = TOOLS / "node"
KEY = "sk-realtool-PLANTED-0123456789abcdef"
ASKED, SENT = "gpt-4o-mini", "fake-4o-routed"


def _need(program: str) -> str:
    exe = shutil.which(program)
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed; CI must have it for the real-tool tests")
        pytest.skip(f"{program} is not installed")
    return exe


@pytest.fixture(scope="session")
def node_tools() -> Path:
    """The npm tools (cline, openai, undici), installed once by scripts/install_tools.sh."""
    _need("npm")
    if not (NODE_DIR / "node_modules" / ".bin" / "cline").exists():
        r = subprocess.run(["bash", str(REPO / "scripts" / "install_tools.sh")], capture_output=True, text=True,
                           timeout=900, env={**os.environ, "LLMTAP_TEST_TOOLS": str(TOOLS)})
        assert r.returncode == 0, f"scripts/install_tools.sh failed:\n{r.stdout}\n{r.stderr}"
    return NODE_DIR


class Recorded:
    """A real proxy recording into a real DuckDB file; the route renames the model."""

    def __init__(self, proxy: RunningProxy, recorder: Recorder, db: Path) -> None:
        self.proxy, self.recorder, self.db = proxy, recorder, db

    def rows(self) -> list[dict]:
        """Every call row, once the proxy has stopped and the recorder committed everything."""
        self.proxy.stop()
        self.recorder.close()
        with duckdb.connect(str(self.db), read_only=True) as con:
            cur = con.execute("SELECT * FROM calls ORDER BY id")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]


@pytest.fixture
def recorded(tmp_path: Path, confdir: Path, fake: FakeProvider) -> Iterator[Recorded]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""\
providers:
  fake: {{base_url: "{fake.url}/v1", api: openai}}
routes:
  - match: {{model: "{ASKED}"}}
    targets: [{{provider: fake, model: {SENT}}}]
""")
    db = tmp_path / "llmtap.duckdb"
    recorder = Recorder(db)
    recorder.start()
    try:
        with RunningProxy(rules, confdir, sink=recorder) as proxy:
            yield Recorded(proxy, recorder, db)
    finally:
        recorder.close()


def _tool_env(tmp_path: Path) -> dict[str, str]:
    """The user's environment for a tool, with its own home (config, state) in tmp_path."""
    home = tmp_path / "tool-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"),
               LLMTAP_UNDICI_DIR=str(NODE_DIR), NO_COLOR="1")
    return env


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{cmd[0]} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _wrap(proxy: RunningProxy, confdir: Path, *cmd: str) -> list[str]:
    return [sys.executable, "-m", "llmtap", "wrap", "--proxy", proxy.proxy_url.removeprefix("http://"),
            "--confdir", str(confdir), "--", *cmd]


# -- Cline CLI -------------------------------------------------------------------------------
def _cline_task(rec: Recorded, fake: FakeProvider, tmp_path: Path, node_tools: Path,
                auth: list[str], wrap_with: Path | None, url: str) -> list[dict]:
    """Cline reads a file with one tool call, then answers: two calls, tied by the call id."""
    cline = str(node_tools / "node_modules" / ".bin" / "cline")
    work = tmp_path / "work"
    work.mkdir()
    notes = work / "notes.txt"
    notes.write_text("the launch code is 0451\n")
    env = _tool_env(tmp_path)
    if wrap_with is None:
        # Through the gateway Cline needs nothing of llmtap's; local mode only keeps Cline from
        # leaving a background hub process behind when the test ends.
        env["CLINE_SESSION_BACKEND_MODE"] = "local"
    fake.chat_reasoning_field = "reasoning_content"
    task = [cline, "-c", str(work), "--json", "-t", "120", "Read notes.txt and tell me the launch code."]
    earlier = 0
    try:
        if wrap_with is not None:
            # The user ran Cline before, without llmtap: its background hub process is up with
            # that environment, and a later wrapped `cline` hands its session to that hub.
            fake.script(ok(tool=False))
            _run([cline, "auth", "openai-compatible", "-k", KEY, "-m", ASKED, "-b",
                  f"{rec.proxy.gateway_url}/fake"], env, work)
            _run([cline, "-c", str(work), "--json", "-t", "60", "Say hello."], env, work)
            earlier = len(fake.requests)
        fake.script(ok(tool="read_files", tool_args={"files": [{"path": str(notes)}]}), ok(tool=False))
        _run([cline, "auth", *auth], env, work)
        r = _run(task if wrap_with is None else _wrap(rec.proxy, wrap_with, *task), env, work, timeout=200)
    finally:
        _stop_cline_hubs(Path(env["HOME"]))
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    result = [e for e in events if e.get("type") == "run_result"]
    assert result and result[-1]["finishReason"] == "completed", r.stdout[-3000:]
    # Cline read the file the fake asked for, and sent its content back as the tool result.
    # Cline read the file the fake asked for, and sent its content back as the tool result.
    answered = [q.json for q in fake.requests[earlier:]
                if any(m.get("role") == "tool" for m in (q.json or {}).get("messages", []))]
    assert answered, "Cline never sent the tool result back"
    tool_msgs = [m for m in answered[0]["messages"] if m.get("role") == "tool"]
    assert "0451" in json.dumps(tool_msgs[-1])
    # The hub of the earlier run may still send calls of its own (titles): pick the task's rows.
    rows = [row for row in rec.rows() if row["url"] == url]
    assert len(rows) == 2, [row["url"] for row in rec.rows()]
    first, last = rows
    for row in rows:
        assert (row["model_requested"], row["model_sent"], row["provider"], row["status"]) == (ASKED, SENT, "fake", 200)
        assert row["reasoning"] == fake.reasoning_text and row["input_tokens"] and row["output_tokens"]
    calls = json.loads(first["tool_calls"])
    assert [c["name"] for c in calls] == ["read_files"] and str(notes) in calls[0]["arguments"]
    assert tool_msgs[-1]["tool_call_id"] == calls[0]["id"]
    assert last["content"] == fake.reply_text and last["finish_reason"] == "stop"
    return rows


def _stop_cline_hubs(home: Path) -> None:
    """Kill any Cline hub daemon started under `home` (Cline starts one unless in local mode)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--cline-hub-daemon" in cmdline and f"HOME={home}".encode() in environ:
            try:
                os.kill(int(proc.name), 9)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(900)
def test_cline_cli_completes_a_tool_task_through_the_gateway(recorded: Recorded, fake: FakeProvider, tmp_path: Path,
                                                             node_tools: Path) -> None:
    gateway = recorded.proxy.gateway_url
    _cline_task(recorded, fake, tmp_path, node_tools, wrap_with=None, url=f"{gateway}/fake/chat/completions",
                auth=["openai-compatible", "-k", KEY, "-m", ASKED, "-b", f"{gateway}/fake"])
    assert KEY.encode() not in recorded.db.read_bytes()


@pytest.mark.timeout(900)
def test_cline_cli_under_llmtap_wrap_goes_through_the_proxy(recorded: Recorded, fake: FakeProvider, tmp_path: Path,
                                                            node_tools: Path, confdir: Path) -> None:
    # Cline's own OpenAI provider talks to api.openai.com; only the proxy can see that traffic.
    _cline_task(recorded, fake, tmp_path, node_tools, wrap_with=confdir,
                url="https://api.openai.com/v1/chat/completions",
                auth=["openai", "-k", KEY, "-m", ASKED, "-b", "https://api.openai.com/v1"])


# -- the npm openai SDK ----------------------------------------------------------------------
NODE_SCRIPT = """\
import OpenAI from 'openai';
const client = new OpenAI({apiKey: process.env.KEY, maxRetries: 0});
const stream = await client.chat.completions.create({
  model: process.env.MODEL, stream: true, stream_options: {include_usage: true},
  messages: [{role: 'user', content: 'How many holes?'}]});
let text = '';
for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
console.log(JSON.stringify({text}));
"""


@pytest.mark.timeout(900)
def test_npm_openai_sdk_under_llmtap_wrap_node_is_recorded(recorded: Recorded, fake: FakeProvider, tmp_path: Path,
                                                           node_tools: Path, confdir: Path) -> None:
    _need("node")
    script = node_tools / "llmtap-test-openai.mjs"  # beside node_modules, so `import 'openai'` resolves
    script.write_text(NODE_SCRIPT)
    env = dict(_tool_env(tmp_path), KEY=KEY, MODEL=ASKED)
    fake.chat_reasoning_field = "reasoning"
    r = _run(_wrap(recorded.proxy, confdir, "node", str(script)), env, tmp_path)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"text": fake.reply_text}
    assert "Warning" not in r.stderr, r.stderr  # the preload keeps the wrapped tool's output clean
    (row,) = recorded.rows()
    assert row["url"] == "https://api.openai.com/v1/chat/completions" and row["client"].startswith("OpenAI/JS")
    assert (row["model_requested"], row["model_sent"], row["stream"], row["complete"]) == (ASKED, SENT, True, True)
    assert row["content"] == fake.reply_text and row["reasoning"] == fake.reasoning_text
    assert row["output_tokens"] and row["input_tokens"] == fake.input_tokens


# -- simonw's llm ----------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_llm_cli_through_the_gateway_is_recorded(recorded: Recorded, fake: FakeProvider, tmp_path: Path) -> None:
    llm = Path(sys.executable).with_name("llm")
    if not llm.exists():
        pytest.fail("the `llm` CLI is missing from the venv: it is a test dependency in pyproject.toml")
    env = _tool_env(tmp_path)
    user = tmp_path / "llm-user"
    user.mkdir()
    (user / "extra-openai-models.yaml").write_text(
        f"- model_id: through-llmtap\n  model_name: {ASKED}\n  api_base: \"{recorded.proxy.gateway_url}/fake\"\n"
        "  api_key_name: llmtap-test\n")
    (user / "keys.json").write_text(json.dumps({"llmtap-test": KEY}))
    env.update(LLM_USER_PATH=str(user))
    fake.chat_reasoning_field = "reasoning_content"
    r = _run([str(llm), "-m", "through-llmtap", "--no-log", "How many holes?"], env, tmp_path)
    assert r.stdout.strip() == fake.reply_text
    (row,) = recorded.rows()
    assert row["client"] and "OpenAI/Python" in row["client"]
    assert (row["model_requested"], row["model_sent"], row["provider"]) == (ASKED, SENT, "fake")
    assert row["content"] == fake.reply_text and row["reasoning"] == fake.reasoning_text
    assert row["input_tokens"] == fake.input_tokens and row["output_tokens"]
    assert KEY.encode() not in recorded.db.read_bytes()
