"""`llmtap run`, `llmtap env`, `llmtap wrap` and `llmtap rules check`."""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtap import paths
from llmtap.recorder.events import CallFinished, CallStarted, Chunk, ResponseHead
from llmtap.recorder.record import DEFAULT_BODY_LIMIT, size_text
from llmtap.recorder.services import Options

if TYPE_CHECKING:
    from llmtap.addons.runner import RunConfig
    from llmtap.recorder.process import RecorderProcess
    from llmtap.recorder.recorder import Recorder

# `llmtap run --tui`: (config, sink, recorder) -> exit code. The UI is handed in by the
# composition root (llmtap.compose) because this area never imports llmtap.tui.
TuiRunner = Callable[["RunConfig", Any, Any], int]

RUN_EPILOG = """\
two ways in:
  HTTPS_PROXY  for tools that honour a proxy: eval "$(llmtap env)", or
               llmtap wrap -- CMD. Only LLM API hosts are decrypted; every
               other host passes as an untouched TLS tunnel.
  base URL     for tools that take one: http://127.0.0.1:8081/<provider>, e.g.
               http://127.0.0.1:8081/openai     -> https://api.openai.com/v1
               http://127.0.0.1:8081/anthropic  -> https://api.anthropic.com

Ctrl-C (or SIGTERM) stops it once every call is committed, and says how many.
While it runs, `llmtap stats`, `llmtap export` and `llmtap tui` read the file
through it.

examples:
  llmtap run                          proxy :8080, gateway :8081, ./rules.yaml
  llmtap run --tui                    the same, with the live terminal UI
  llmtap run --gateway-token          tools that send the token as API key use your key_env keys
  llmtap run --proxy off --db /tmp/try.duckdb   only the gateway, another file
  llmtap run --gateway 0.0.0.0:8081   gateway reachable from the LAN: anyone there can use it,
                                      and with --gateway-token anyone who has the token
  llmtap run --metrics 9464           Prometheus metrics at http://127.0.0.1:9464/metrics
  llmtap run --otlp http://127.0.0.1:4318   each call as an OpenTelemetry span (Jaeger, Tempo,
                                      Langfuse, Phoenix); --otlp-content full adds the messages

security:
  The gateway adds a provider's key_env key only for a client that sent the llmtap gateway
  token as its API key, or on a fallback to another provider after the client sent its own
  key. Requests from web pages (an Origin header not given with --allow-origin) and requests
  addressed by a foreign Host name (DNS rebinding) are refused with 403 and recorded.
"""


def register(sub: argparse._SubParsersAction, run_tui: TuiRunner | None = None) -> None:
    from llmtap.helpformat import HelpFormatter

    run = sub.add_parser(
        "run",
        help="run the proxy and gateway, recording every call",
        description="Run llmtap: an HTTPS proxy listener and a base-URL gateway in one "
        "process. Each LLM call is routed by rules.yaml (with fallbacks) and recorded into the "
        "DuckDB file; a line per call goes to stdout.",
        epilog=RUN_EPILOG,
        formatter_class=HelpFormatter,
    )
    run.add_argument("--proxy", metavar="HOST:PORT", default="127.0.0.1:8080",
                     help="HTTPS_PROXY listener (default: %(default)s); 'off' to disable")
    run.add_argument("--gateway", metavar="HOST:PORT", default="127.0.0.1:8081",
                     help="base-URL gateway listener (default: %(default)s); 'off' to disable")
    run.add_argument("--rules", metavar="PATH", type=Path, default=None,
                     help="routing rules (default: ./rules.yaml if present, else "
                     f"{paths.config_dir() / 'rules.yaml'}; none found: built-in providers, no routes)")
    run.add_argument("--db", metavar="PATH", type=Path, default=None,
                     help=f"DuckDB file to record into, held by a recorder process beside the proxy "
                          f"(default: {paths.default_db()})")
    run.add_argument("--max-body", metavar="SIZE", type=parse_size, default=DEFAULT_BODY_LIMIT,
                     help=f"the most of each body the record keeps (default: {size_text(DEFAULT_BODY_LIMIT)}; "
                          "e.g. 512K, 64M): requests and responses as they crossed the wire, and a "
                          "compressed response as many bytes again once decoded; a note says what was "
                          "left out. Clients and upstreams always get whole bodies")
    run.add_argument("--buffer-mb", metavar="MB", type=_positive_int, default=256,
                     help="memory for records while the DB cannot be written (full disk, read-only folder, "
                          "file held by another program): they wait there, the proxy goes on, and they land "
                          "once the DB can be written again (tried every few seconds, no restart needed). Past "
                          "this they go to DB.spool.jsonl beside it; when that cannot be written either, each "
                          "lost call is counted in the `dropped` table (default: %(default)s)")
    run.add_argument("--no-record", action="store_true",
                     help="proxy without recording (to measure llmtap's own overhead)")
    run.add_argument("--confdir", metavar="DIR", type=Path, default=None,
                     help=f"where the CA certificate lives (default: {paths.default_confdir()})")
    run.add_argument("--gateway-token", action="store_true",
                     help="let clients that send the llmtap token as their API key use the providers' "
                          "key_env keys; the token is $LLMTAP_GATEWAY_TOKEN, else the one in "
                          f"{paths.config_dir() / 'gateway-token'} (created, readable by you only). "
                          "Also on when $LLMTAP_GATEWAY_TOKEN is set")
    run.add_argument("--allow-origin", metavar="ORIGIN", action="append", default=[],
                     help="a browser Origin allowed to use the gateway, e.g. http://localhost:3000 "
                          "(repeatable; default: none, requests from web pages are refused)")
    run.add_argument("--tui", action="store_true", help="show the live terminal UI in this process")
    run.add_argument("-q", "--quiet", action="store_true", help="no line per call on stdout")
    # -- services of the recorder's process (--metrics, ...) --
    run.add_argument("--metrics", metavar="HOST:PORT", type=_metrics_address, default=None,
                     help="serve Prometheus metrics at http://HOST:PORT/metrics from the recorder process "
                          "(a bare PORT listens on 127.0.0.1): calls by provider, model, route, API, status "
                          "class and stream, attempts, fallbacks, duration and time-to-first-byte histograms, "
                          "tokens, cost, cut streams, calls in flight, the recorder's queue, drops and spool. "
                          "A port in use is said once and recording goes on without metrics. Off by default")
    # -- the archive schedule (recorder/archive.py), run inside the recorder's process
    run.add_argument("--archive-to", metavar="DIR|s3://BUCKET/PREFIX", default=None,
                     help="archive finished calls there as Parquet on a schedule, as `llmtap archive --to` "
                          "does (S3 credentials: the AWS_* variables or AWS_PROFILE of this process)")
    run.add_argument("--archive-every", metavar="AGE", default=None,
                     help="how often to archive, e.g. 1h, 30m (default with --archive-to: 1h)")
    run.add_argument("--keep", metavar="AGE", default=None,
                     help="with --archive-to: remove from the DB the archived calls older than AGE, e.g. 30d "
                          "(calls not archived yet always stay)")
    # Sessions (recorder/sessions.py)
    run.add_argument("--session-idle", metavar="AGE", type=_age_seconds, default=None,
                     help="a session found from its traffic (tool calls, history) ends after this long "
                          "without a call: the next one starts a new session (default: 30m; e.g. 10m, 2h). "
                          "Ids a tool sends and --session labels name their session whatever the gap")
    # -- OpenTelemetry traces (recorder/otlp.py)
    run.add_argument("--otlp", metavar="URL", default=None, type=_otlp_url,
                     help="send each finished call as an OpenTelemetry span (GenAI conventions) over "
                          "OTLP/HTTP to URL/v1/traces, e.g. http://127.0.0.1:4318 (Jaeger, Tempo, a "
                          "collector) or https://cloud.langfuse.com/api/public/otel. Default: "
                          "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (as given) or $OTEL_EXPORTER_OTLP_ENDPOINT; "
                          "headers (credentials) from $OTEL_EXPORTER_OTLP_HEADERS. A collector that is "
                          "down or slow never slows the proxy: spans beyond a bounded queue are dropped, "
                          "counted, and `llmtap export otlp` sends them later")
    run.add_argument("--otlp-content", choices=("none", "full"), default=None,
                     help="full: also send prompts, answers and reasoning (gen_ai.input.messages, "
                          "gen_ai.output.messages, gen_ai.system_instructions), masked as the record is "
                          "(default: none; full when $OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true)")
    run.add_argument("--otlp-content-max", metavar="CHARS", type=_positive_int, default=None,
                     help="with --otlp-content full, the most characters of each of those attributes; "
                          "longer texts are cut with a mark saying how much was left out (default: 32768)")
    run.set_defaults(func=functools.partial(cmd_run, run_tui=run_tui))

    env = sub.add_parser(
        "env",
        help="print the shell exports that send a tool through llmtap",
        description="Print exports for HTTPS_PROXY and the CA bundle, for `eval \"$(llmtap env)\"`. "
        "SSL_CERT_FILE, REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE point at a bundle of the system's "
        "CAs plus llmtap's, so hosts that are not decrypted still verify.",
        epilog="example:\n  eval \"$(llmtap env)\"; python my_agent.py",
        formatter_class=HelpFormatter,
    )
    _client_args(env)
    env.set_defaults(func=cmd_env)

    wrap = sub.add_parser(
        "wrap",
        help="run a command with the llmtap environment set",
        description="Run CMD with HTTPS_PROXY and the CA variables set (see `llmtap env`), "
        "so its calls go through a running `llmtap run`. Exits with CMD's exit code.",
        epilog="examples:\n  llmtap wrap -- python agent.py --task 'summarise'\n"
        "  llmtap wrap --session research-42 -- python -m local_deep_research.main\n"
        "  llmtap sessions research-42        # its calls as a timeline",
        formatter_class=HelpFormatter,
    )
    _client_args(wrap)
    wrap.add_argument("--session", metavar="NAME", default=None,
                      help="record every call CMD makes in one session NAME (`llmtap sessions`); the "
                      "name rides in the proxy URL's user part, http://NAME@127.0.0.1:8080, which HTTP "
                      "clients send to the proxy when they connect, so CMD needs no change")
    wrap.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...",
                      help="the command to run and its arguments, after `--` so that its own "
                      "options are not taken for llmtap's")
    wrap.set_defaults(func=cmd_wrap)

    from llmtap.addons.rules import add_rules_parser

    add_rules_parser(sub)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proxy", metavar="HOST:PORT", default="127.0.0.1:8080",
                   help="where `llmtap run` listens (default: %(default)s)")
    p.add_argument("--confdir", metavar="DIR", type=Path, default=None,
                   help=f"the CA's directory (default: {paths.default_confdir()})")


# -- env / wrap -----------------------------------------------------------------------------
def client_env(proxy: str, confdir: Path, *, install_node_support: bool = True) -> dict[str, str]:
    """The variables that make common HTTP stacks use llmtap and trust its CA."""
    from llmtap.addons.hostport import parse_hostport
    from llmtap.addons.node import node_env

    host, port = parse_hostport(proxy, "--proxy")
    ca = ensure_ca(confdir)
    bundle = confdir / "llmtap-ca-bundle.pem"
    import certifi  # mitmproxy depends on it: always present

    system = Path(certifi.where()).read_bytes()
    wanted = system.rstrip(b"\n") + b"\n" + ca.read_bytes()
    if not bundle.exists() or bundle.read_bytes() != wanted:
        with paths.private_files():
            bundle.write_bytes(wanted)
    url = f"http://{host}:{port}"
    no_proxy = ",".join(x for x in ("localhost", "127.0.0.1", "::1", os.environ.get("NO_PROXY", "")) if x)
    return {
        "HTTPS_PROXY": url,
        "https_proxy": url,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        "SSL_CERT_FILE": str(bundle),
        "REQUESTS_CA_BUNDLE": str(bundle),
        "CURL_CA_BUNDLE": str(bundle),
        "NODE_EXTRA_CA_CERTS": str(ca),
        **node_env(dict(os.environ), install=install_node_support),
    }


def ensure_ca(confdir: Path) -> Path:
    """mitmproxy's CA certificate, created now if `llmtap run` never ran with this confdir."""
    cert = confdir / "mitmproxy-ca-cert.pem"
    # The folder holds the CA's private key: whoever reads it can sign for any host.
    paths.private_ca_dir(confdir)
    if not cert.exists():
        from mitmproxy.certs import CertStore

        with paths.private_files():  # mitmproxy makes only the key private, by itself
            CertStore.from_store(confdir, "mitmproxy", 2048)
    return cert


def cmd_env(args: argparse.Namespace) -> int:
    env = client_env(args.proxy, args.confdir or paths.default_confdir())
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def cmd_wrap(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("llmtap wrap: no command given. Example: llmtap wrap -- python agent.py", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.update(client_env(args.proxy, args.confdir or paths.default_confdir()))
    if getattr(args, "session", None):
        from urllib.parse import quote

        label = f"http://{quote(args.session, safe='')}@"
        for key in ("HTTPS_PROXY", "https_proxy"):
            env[key] = label + env[key].removeprefix("http://")
    try:
        return subprocess.call(cmd, env=env)
    except FileNotFoundError:
        print(f"llmtap wrap: command not found: {cmd[0]}", file=sys.stderr)
        return 127


# -- run ------------------------------------------------------------------------------------
_SIZE_UNITS = {"": 0, "K": 10, "KB": 10, "KIB": 10, "M": 20, "MB": 20, "MIB": 20, "G": 30, "GB": 30, "GIB": 30}


def parse_size(text: str) -> int:
    """`8M`, `512K`, `1G`, `65536`: bytes (binary units, as the notes print them)."""
    t = text.strip().upper().replace(" ", "")
    number = t.rstrip("KMGIB")
    unit = t[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write bytes or K/M/G, e.g. 8M or 512K")
    size = int(value * (1 << _SIZE_UNITS[unit]))
    if size < 1024:
        raise argparse.ArgumentTypeError(f"{text!r} is under 1K: the record would keep almost nothing; "
                                         "give at least 1K")
    return size


def format_call_line(call: CallFinished, *, judge_hangup: bool = True) -> str:
    """One line per call, as mitmdump users expect to see traffic go by.

    Every field but the times comes from the network (the client's User-Agent, model names,
    the upstream's error): each is masked of the call's secrets and made printable, so an
    escape sequence in an upstream error cannot act on the user's terminal. With
    `judge_hangup`, the answer of a client that hung up is read to tell a whole one from a cut
    one (see `_left_after_the_end`): not on the proxy's event loop (`_print_line`)."""
    from llmtap.recorder.redact import Scrubber, printable

    # The request body is searched for credential fields only when there is an error to
    # print (the one place an upstream echoes them): a clean call costs no body scan.
    scrub = Scrubber.for_call(call, body=call.error is not None)

    def field(value: str | None) -> str:
        return printable(scrub.text(value) or "-")

    t = call.started_at.astimezone().strftime("%H:%M:%S")
    asked = field(call.model_requested)
    sent = field(call.model_sent) if call.model_sent else asked
    model = asked if sent == asked else f"{asked} → {sent}"
    fallback = f" {call.attempts}↻" if call.attempts > 1 else ""
    ms = f"{call.duration_ms:.0f}ms" if call.duration_ms is not None else "-"
    client = field((call.client or "-").split(" ", 1)[0])[:24]
    if call.error and judge_hangup and _left_after_the_end(call):
        tail = "  (the client hung up after the answer's end)"
    else:
        tail = f"  ! {field(call.error)}" if call.error else ""
    return (f"{t} {client:<24} {field(call.method)} {model}  {field(call.provider)}  {call.status or '-'}"
            f"{fallback}  {ms}{tail}")


# The call line reads an answer the client hung up on up to this much; above it the line keeps
# the relay's error (the record decides the same question either way).
LINE_READ_BYTES = 256 << 10
# Those answers are read in a thread of their own, at most this many waiting: past that (a flood
# of hang-ups) a line keeps the relay's error, and memory stays bounded. A judged line may come
# after lines of calls that ended later; each line carries its call's start time.
_HANGUPS_WAITING = 16
_HANGUP_SLOTS = threading.BoundedSemaphore(_HANGUPS_WAITING)
_HANGUP_LINES = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmtap-call-line")


def _left_after_the_end(call: CallFinished) -> bool:
    """Whether the client hung up on a whole answer, as the record will say (see
    extract.left_after_the_end): an SDK closing on `[DONE]` is not a failed call."""
    if not call.client_left or len(call.response_body) > LINE_READ_BYTES:
        return False
    from llmtap.recorder.extract import extract, left_after_the_end

    try:
        ex = extract(call.api, call.status, dict(call.response_headers), call.response_body)
    except Exception:  # extraction never raises; if it did, the line says what the relay saw
        return False
    return left_after_the_end(call.client_left, call.status, ex)


def cmd_run(args: argparse.Namespace, run_tui: TuiRunner | None = None) -> int:
    from llmtap.addons.hostport import StartupError, parse_hostport

    try:
        proxy = None if args.proxy == "off" else parse_hostport(args.proxy, "--proxy")
        gateway = None if args.gateway == "off" else parse_hostport(args.gateway, "--gateway")
    except StartupError as exc:
        print(f"llmtap: {exc}", file=sys.stderr)
        return 2
    if proxy is None and gateway is None:
        print("llmtap: --proxy off and --gateway off leave nothing to run", file=sys.stderr)
        return 2
    if args.metrics and args.no_record:
        print("llmtap: --metrics counts the calls the recorder commits, and --no-record starts no recorder: "
              "leave one of them out", file=sys.stderr)
        return 2
    if args.tui and run_tui is None:
        print("llmtap: --tui: no UI was handed to `run` (llmtap.cli passes llmtap.compose's)",
              file=sys.stderr)
        return 2
    rules_path = args.rules or paths.default_rules()
    if args.rules is None and not rules_path.is_file():
        rules_path = None  # no rules anywhere: built-in providers, pass-through recording
    elif not rules_path.is_file():
        print(f"llmtap: --rules {rules_path}: no such file. Copy the example rules.yaml from the "
              "llmtap repository there, or leave --rules out to run with built-in providers only.",
              file=sys.stderr)
        return 2
    confdir = args.confdir or paths.default_confdir()
    db = args.db or paths.default_db()
    token, token_path = None, None
    if args.gateway_token or os.environ.get("LLMTAP_GATEWAY_TOKEN"):
        try:
            token, token_path = gateway_token()
        except OSError as exc:
            print(f"llmtap: --gateway-token: cannot read or create {exc.filename}: {exc.strerror}. "
                  "Set LLMTAP_GATEWAY_TOKEN instead.", file=sys.stderr)
            return 2

    # The recorder process loads DuckDB and opens the file while this one loads mitmproxy:
    # each takes most of a second, and they no longer wait for each other.
    if args.tui:  # everything in this process, nothing to overlap: log as before the recorder starts
        from llmtap.addons.runner import configure_logging

        configure_logging()
    services = _service_options(args)
    # The recorder prices calls with the file's `price` entries, reading it (and its edits) itself.
    services.rules = str(rules_path) if rules_path is not None else None
    sink, recorder = _make_sink(db, args.no_record, in_process=args.tui, body_limit=args.max_body,
                                buffer_mb=args.buffer_mb, wait=False, services=_with_sessions(services, args))
    if recorder is None and not args.no_record:
        return 2
    from llmtap import gctune
    from llmtap.addons import rules as rules_mod
    from llmtap.addons.runner import RunConfig, configure_logging, serve

    configure_logging()
    if recorder is not None and not args.tui and not _recorder_ready(recorder, db):
        return 2
    config = RunConfig(proxy=proxy, gateway=gateway, rules_path=rules_path, confdir=confdir,
                       gateway_token=token, allow_origins=tuple(args.allow_origin), body_limit=args.max_body)
    handed = 0  # calls finished by the proxy, for the stop line
    started = False

    def on_finished(call: CallFinished) -> None:
        nonlocal handed
        handed += 1
        if not args.quiet:
            _print_line(call)

    async def ready(p) -> None:
        nonlocal started
        started = True
        # Start-up done: its objects (mitmproxy's modules, and Textual's and DuckDB's with --tui)
        # frozen, the young generation collected less often (llmtap.gctune).
        gctune.settle(freeze=True)
        if args.tui:
            return
        rules = p.rules.current
        lines = []
        if p.proxy_addr:
            lines.append(f"proxy     http://{p.proxy_addr[0]}:{p.proxy_addr[1]}   (HTTPS_PROXY; eval \"$(llmtap env)\")")
        if p.gateway_addr:
            lines.append(f"gateway   http://{p.gateway_addr[0]}:{p.gateway_addr[1]}/<provider>   "
                         f"(providers: {', '.join(sorted(rules.providers))})")
        lines.append(f"rules     {rules_path or 'none (built-in providers, no routes)'}"
                     f"   ({len(rules.routes)} routes)")
        if token is not None:
            where = "$LLMTAP_GATEWAY_TOKEN" if token_path is None else f"{token_path} (cat it)"
            lines.append(f"token     {where}: send it as the API key to use the key_env keys")
        lines.append(f"db        {'not recording' if recorder is None else db}")
        lines.append(f"CA        {confdir / 'mitmproxy-ca-cert.pem'}")
        if services.otlp:
            from llmtap.recorder.otlp import shown

            content = services.otlp["content"]
            lines.append(f"traces    {shown(services.otlp['endpoint'])}   (OTLP/HTTP; message content: {content}"
                         f"{'' if content == 'full' else ', --otlp-content full sends it'})")
        print("llmtap " + "\n       ".join(lines), file=sys.stderr, flush=True)

    try:
        if args.tui:
            assert run_tui is not None  # checked above, before anything started
            return run_tui(config, sink, recorder)
        asyncio.run(serve(config, sink, ready=ready, on_finished=on_finished))
    except StartupError as exc:
        print(f"llmtap: {exc}", file=sys.stderr)
        return 2
    except rules_mod.RulesError as exc:
        print(f"llmtap: {exc}", file=sys.stderr)
        return 2
    finally:
        if recorder is not None:
            recorder.close()
        if started:
            _flush_lines()
            print(_stopped_line(recorder, db, handed), file=sys.stderr, flush=True)
        # Objects frozen by gctune.settle are never freed at exit, and DuckDB's bindings (loaded
        # here with --tui) then print a screen of "nanobind: leaked ..." on every stop.
        gc.unfreeze()
    return 0


def gateway_token() -> tuple[str, Path | None]:
    """(token, file it came from): $LLMTAP_GATEWAY_TOKEN, else the token file, created with a
    fresh random token readable by the user only."""
    env = os.environ.get("LLMTAP_GATEWAY_TOKEN", "").strip()
    if env:
        return env, None
    path = paths.config_dir() / "gateway-token"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if text:
        return text, path
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = "llmtap-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, path


def _stopped_line(recorder: RecorderProcess | None, db: Path, handed: int) -> str:
    """What a stop leaves behind: the calls committed, and any the recorder could not keep."""

    def calls(n: int) -> str:
        return f"{n:,} call{'' if n == 1 else 's'}"

    if recorder is None:
        return f"llmtap: stopped; {calls(handed)} proxied, none recorded (--no-record)"
    # Calls the recorder lost (a full disk with no room for the spool) count as not recorded.
    lost_there = recorder.lost_total
    committed = recorder.committed_total - lost_there
    lost = handed - committed
    tail = "none lost" if lost <= 0 else f"{lost:,} not recorded (see the messages above)"
    # recorder.spool_path's name, not imported: that module loads DuckDB into the proxy.
    spool = db.with_name(db.name + ".spool.jsonl")
    if spool.exists():
        return (f"llmtap: stopped; {calls(committed)} committed to {db} or kept in {spool} "
                f"(imported on the next start), {tail}")
    return f"llmtap: stopped; {calls(committed)} committed to {db}, {tail}"


def _print_line(call: CallFinished) -> None:
    """Print the call's line. Runs on the proxy's event loop: a client that hung up has its
    answer read (a few ms for 256 KiB) in the call-line thread instead."""
    if call.client_left and call.error and _HANGUP_SLOTS.acquire(blocking=False):
        _HANGUP_LINES.submit(_print_judged, call)
    else:
        _print(format_call_line(call, judge_hangup=False))


def _print_judged(call: CallFinished) -> None:
    try:
        _print(format_call_line(call))
    finally:
        _HANGUP_SLOTS.release()


def _print(line: str) -> None:
    try:
        print(line, flush=True)
    except (BrokenPipeError, ValueError):  # stdout closed: keep proxying regardless
        pass


def _flush_lines() -> None:
    """Wait for the call lines still being judged, so that they come before the stop line."""
    _HANGUP_LINES.submit(lambda: None).result()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of megabytes, e.g. 256")
    return value


def _metrics_address(text: str) -> str:
    """`--metrics`: HOST:PORT as the recorder's process binds it (a bare port on loopback)."""
    from llmtap.addons.hostport import StartupError, parse_hostport

    try:
        host, port = parse_hostport(text, "--metrics")
    except StartupError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT or PORT, e.g. --metrics 127.0.0.1:9464 "
                                         "(the port Prometheus scrapes)") from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
def _age_seconds(text: str) -> float:
    """`30m`, `2h`, `90s`, `1d`: seconds (the --session-idle flag)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age; write e.g. 30m, 2h or 90s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def _with_sessions(options: Options, args: argparse.Namespace) -> Options:
    if getattr(args, "session_idle", None):
        options.sessions = {**options.sessions, "idle_s": args.session_idle}
    return options


def _otlp_url(text: str) -> str:
    from llmtap.recorder.otlp import OtlpError, traces_url

    try:
        traces_url(text)
    except OtlpError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--otlp {text!r}: ")) from None
    return text


def _service_options(args: argparse.Namespace) -> Options:
    """What the recorder's process runs beside its writer, from `llmtap run`'s flags."""
    options = Options(metrics=args.metrics)
    archive_to, every, keep = (getattr(args, k, None) for k in ("archive_to", "archive_every", "keep"))
    if archive_to or every or keep:
        from llmtap.recorder.archive import age_seconds

        if not archive_to:
            flag, why = (("--archive-every", "where to archive") if every else
                         ("--keep", "calls leave the DB only once archived there"))
            print(f"llmtap: {flag} needs --archive-to DIR|s3://BUCKET/PREFIX ({why})", file=sys.stderr)
            raise SystemExit(2)
        seconds: dict[str, float] = {}
        for flag, text in (("--archive-every", every or "1h"), ("--keep", keep)):
            try:
                seconds[flag] = age_seconds(text or "0s")
            except ValueError:
                print(f"llmtap: {flag} {text!r}: expected an age like 30m, 1h, 30d, 1w", file=sys.stderr)
                raise SystemExit(2) from None
        if seconds["--archive-every"] <= 0:
            print("llmtap: --archive-every must be more than 0, e.g. 1h", file=sys.stderr)
            raise SystemExit(2)
        to = archive_to if archive_to.startswith("s3://") else str(Path(archive_to).expanduser().absolute())
        options.archive = {"to": to, "every_s": seconds["--archive-every"], "keep": keep}
    if args.no_record:
        if args.otlp:
            print("llmtap: --otlp sends the recorded calls as spans; with --no-record there are none", file=sys.stderr)
        return options  # traces are made from committed rows: none without a record
    from llmtap.recorder.otlp import OtlpError, resolve

    try:
        options.otlp = resolve(args.otlp, args.otlp_content, args.otlp_content_max)
    except OtlpError as exc:  # from a variable (a bad --otlp stops at the parser)
        print(f"llmtap: {exc}; traces are off", file=sys.stderr)
    return options


def _make_sink(db: Path, no_record: bool, in_process: bool, body_limit: int = DEFAULT_BODY_LIMIT,
               buffer_mb: int = 256, wait: bool = True, services: Options | None = None):
    """(sink, recorder): the recorder when recording, else a sink that keeps nothing.

    The recorder runs in a process of its own (see llmtap.recorder.process), except with the
    TUI in the same process, which reads the recorder directly. It starts even when the file
    cannot be opened yet (it says why and keeps trying); only another `llmtap run` recording
    into it makes it refuse, and then `llmtap run` does not start. With `wait` False a recorder
    process is only begun: _recorder_ready() finishes its start."""
    if no_record:
        return _NullSink(), None
    from llmtap.recorder.process import RecorderProcess  # loads no DuckDB: the child does

    recorder: Recorder | RecorderProcess
    if in_process:
        from llmtap.recorder.recorder import Recorder

        recorder = Recorder(db, body_limit=body_limit, buffer_bytes=buffer_mb << 20, services=services)
    else:  # the proxy's process then never loads DuckDB
        recorder = RecorderProcess(db, body_limit=body_limit, buffer_bytes=buffer_mb << 20, services=services)
    try:
        if isinstance(recorder, RecorderProcess) and not wait:
            recorder.begin()
        else:
            recorder.start()
    except Exception as exc:
        print(f"llmtap: cannot record into {db}: {exc}", file=sys.stderr)
        return None, None
    return recorder, recorder


def _recorder_ready(recorder, db: Path) -> bool:
    """Wait for a recorder process _make_sink(wait=False) began; False (said) when it failed."""
    try:
        recorder.wait_ready()
    except Exception as exc:
        print(f"llmtap: cannot record into {db}: {exc}", file=sys.stderr)
        return False
    return True


class _NullSink:
    def call_started(self, event: CallStarted) -> None:
        pass

    def response_head(self, event: ResponseHead) -> None:
        pass

    def call_chunk(self, event: Chunk) -> None:
        pass

    def call_finished(self, event: CallFinished) -> None:
        pass
