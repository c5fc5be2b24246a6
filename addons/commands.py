"""`llmtap run`, `llmtap env`, `llmtap wrap` and `llmtap rules check`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shlex
import subprocess
import sys
from pathlib import Path

from llmtap import paths
from llmtap.recorder.record import Attempt, Call

RUN_EPILOG = """\
two ways in:
  HTTPS_PROXY   tools that honour a proxy: eval "$(llmtap env)" (or `llmtap wrap -- CMD`);
                only LLM API hosts are decrypted, every other host passes as a raw tunnel
  base URL      tools that take a base URL: http://127.0.0.1:8081/<provider>, e.g.
                http://127.0.0.1:8081/openai  ->  https://api.openai.com/v1
                http://127.0.0.1:8081/anthropic  ->  https://api.anthropic.com

examples:
  llmtap run                          proxy :8080, gateway :8081, rules.yaml from here
  llmtap run --tui                    the same, with the live terminal UI
  llmtap run --gateway 0.0.0.0:8081   gateway reachable from the LAN (no auth: mind it)
"""


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="run the proxy and gateway, recording every call",
        description="Run llmtap: an HTTPS proxy listener and a base-URL gateway in one process. "
        "Each LLM call is routed by rules.yaml (with fallbacks) and recorded into the DuckDB file.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    run.add_argument("--tui", action="store_true", help="show the live terminal UI in this process")
    run.add_argument("-q", "--quiet", action="store_true", help="no line per call on stdout")
    run.set_defaults(func=cmd_run)

    env = sub.add_parser(
        "env",
        help="print the shell exports that send a tool through llmtap",
        description="Print exports for HTTPS_PROXY and the CA bundle, for `eval \"$(llmtap env)\"`. "
        "SSL_CERT_FILE, REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE point at a bundle of the system's "
        "CAs plus llmtap's, so hosts that are not decrypted still verify.",
    )
    _client_args(env)
    env.set_defaults(func=cmd_env)

    wrap = sub.add_parser(
        "wrap",
        help="run a command with the llmtap environment set",
        description="Run CMD with HTTPS_PROXY and the CA variables set (see `llmtap env`).",
        epilog="example: llmtap wrap -- python agent.py --task 'summarise'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _client_args(wrap)
    wrap.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    wrap.set_defaults(func=cmd_wrap)

    from llmtap.addons.rules import add_rules_parser

    add_rules_parser(sub)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proxy", metavar="HOST:PORT", default="127.0.0.1:8080",
                   help="where `llmtap run` listens (default: %(default)s)")
    p.add_argument("--confdir", metavar="DIR", type=Path, default=None,
                   help=f"the CA's directory (default: {paths.default_confdir()})")


# -- env / wrap -----------------------------------------------------------------------------
def client_env(proxy: str, confdir: Path) -> dict[str, str]:
    """The variables that make common HTTP stacks use llmtap and trust its CA."""
    from llmtap.addons.runner import parse_hostport

    host, port = parse_hostport(proxy, "--proxy")
    ca = ensure_ca(confdir)
    bundle = confdir / "llmtap-ca-bundle.pem"
    import certifi  # mitmproxy depends on it: always present

    system = Path(certifi.where()).read_bytes()
    wanted = system.rstrip(b"\n") + b"\n" + ca.read_bytes()
    if not bundle.exists() or bundle.read_bytes() != wanted:
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
    }


def ensure_ca(confdir: Path) -> Path:
    """mitmproxy's CA certificate, created now if `llmtap run` never ran with this confdir."""
    cert = confdir / "mitmproxy-ca-cert.pem"
    if not cert.exists():
        from mitmproxy.certs import CertStore

        confdir.mkdir(parents=True, exist_ok=True)
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
    try:
        return subprocess.call(cmd, env=env)
    except FileNotFoundError:
        print(f"llmtap wrap: command not found: {cmd[0]}", file=sys.stderr)
        return 127


# -- run ------------------------------------------------------------------------------------
def format_call_line(call: Call, attempts: list[Attempt]) -> str:
    """One line per call, as mitmdump users expect to see traffic go by."""
    t = call.started_at.astimezone().strftime("%H:%M:%S")
    asked = call.model_requested or "-"
    sent = call.model_sent or asked
    model = asked if sent == asked else f"{asked} → {sent}"
    fallback = f" {call.attempts}↻" if call.attempts > 1 else ""
    ms = f"{call.duration_ms:.0f}ms" if call.duration_ms is not None else "-"
    client = (call.client or "-").split(" ", 1)[0][:24]
    tail = f"  ! {call.error}" if call.error else ""
    return f"{t} {client:<24} {call.method} {model}  {call.provider or '-'}  {call.status or '-'}{fallback}  {ms}{tail}"


def cmd_run(args: argparse.Namespace) -> int:
    from llmtap.addons import rules as rules_mod
    from llmtap.addons.runner import RunConfig, StartupError, configure_logging, parse_hostport, serve, settle_gc

    configure_logging()
    try:
        proxy = None if args.proxy == "off" else parse_hostport(args.proxy, "--proxy")
        gateway = None if args.gateway == "off" else parse_hostport(args.gateway, "--gateway")
    except StartupError as exc:
        print(f"llmtap: {exc}", file=sys.stderr)
        return 2
    if proxy is None and gateway is None:
        print("llmtap: --proxy off and --gateway off leave nothing to run", file=sys.stderr)
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
    config = RunConfig(proxy=proxy, gateway=gateway, rules_path=rules_path, confdir=confdir)

    sink, recorder = _make_sink(db, args.no_record, in_process=args.tui, buffer_mb=args.buffer_mb)
    if recorder is None and not args.no_record:
        return 2
    on_finished = None if (args.quiet or args.tui) else _print_line

    async def ready(p) -> None:
        settle_gc()
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
        lines.append(f"db        {'not recording' if recorder is None else db}")
        lines.append(f"CA        {confdir / 'mitmproxy-ca-cert.pem'}")
        print("llmtap " + "\n       ".join(lines), file=sys.stderr, flush=True)

    try:
        if args.tui:
            from llmtap.tui.commands import run_with_proxy

            return run_with_proxy(config, sink, recorder)
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
        # Objects frozen by settle_gc are never freed at exit, and DuckDB's bindings (loaded
        # here with --tui) then print a screen of "nanobind: leaked ..." on every stop.
        gc.unfreeze()
    return 0


def _print_line(call: Call, attempts: list[Attempt]) -> None:
    try:
        print(format_call_line(call, attempts), flush=True)
    except (BrokenPipeError, ValueError):  # stdout closed: keep proxying regardless
        pass


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of megabytes, e.g. 256")
    return value


def _make_sink(db: Path, no_record: bool, in_process: bool, buffer_mb: int = 256):
    """(sink, recorder): the recorder when recording, else a sink that keeps nothing.

    The recorder runs in a process of its own (see llmtap.recorder.process), except with the
    TUI in the same process, which reads the recorder directly. It starts even when the file
    cannot be opened yet (it says why and keeps trying); only another `llmtap run` recording
    into it makes it refuse, and then `llmtap run` does not start."""
    if no_record:
        return _NullSink(), None
    if in_process:
        from llmtap.recorder.recorder import Recorder

        recorder = Recorder(db, buffer_bytes=buffer_mb << 20)
    else:  # the proxy's process then never loads DuckDB
        from llmtap.recorder.process import RecorderProcess

        recorder = RecorderProcess(db, buffer_bytes=buffer_mb << 20)
    try:
        recorder.start()
    except Exception as exc:
        print(f"llmtap: cannot record into {db}: {exc}", file=sys.stderr)
        return None, None
    return recorder, recorder


class _NullSink:
    def call_started(self, call: Call) -> None:
        pass

    def call_chunk(self, call_id: str, chunk: bytes) -> None:
        pass

    def call_finished(self, call: Call, attempts: list[Attempt]) -> None:
        pass
