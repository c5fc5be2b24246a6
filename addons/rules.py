"""rules.yaml: providers, routes with fallback targets, and `llmtap rules check`.

The file is parsed from YAML nodes rather than plain objects so that every problem can name
the line it is on. All problems are collected before failing: a user fixing a rules file
should see every mistake in one go, each with what to write instead.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

APIS = ("openai", "anthropic", "ollama", "gemini")
RETRY_WORDS = ("connect", "timeout")
DEFAULT_ON = ("connect", "timeout", "408", "409", "429", "5xx")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STATUS_WORD = re.compile(r"[1-5](?:\d\d|xx)")


class RulesError(Exception):
    """Every problem of a rules file, each as 'file:line: what is wrong; what to write'."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        head = f"{source or 'rules'}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in problems))


class EmptyRulesError(RulesError):
    """The file holds nothing: 0 bytes, blanks or only comments. Never taken as "no rules": an
    editor truncates a file while saving it, and a file cut short can be all comments."""


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_url: str
    api: str
    key_env: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    builtin: bool = False

    @property
    def scheme(self) -> str:
        return urlsplit(self.base_url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.base_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def base_path(self) -> str:
        """The API's path prefix without a trailing slash ('' for the host's root)."""
        return urlsplit(self.base_url).path.rstrip("/")


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    model: str | None = None  # None keeps the model the client asked for


@dataclass(frozen=True, slots=True)
class Retry:
    attempts: int = 1  # per target
    backoff_ms: int = 200
    on: tuple[str, ...] = DEFAULT_ON
    retry_after_cap_s: float = 30.0

    @property
    def retries_connect(self) -> bool:
        return "connect" in self.on

    @property
    def retries_timeout(self) -> bool:
        return "timeout" in self.on

    def retries_status(self, status: int) -> bool:
        code = str(status)
        return code in self.on or f"{code[0]}xx" in self.on


@dataclass(frozen=True, slots=True)
class Timeout:
    connect_s: float = 10.0
    first_byte_s: float = 120.0


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: Mapping[str, str]  # model / host / path / client -> glob
    targets: tuple[Target, ...]
    retry: Retry = Retry()
    timeout: Timeout = Timeout()
    line: int = 0
    api: str | None = None  # the wire format its targets speak

    def matches(self, *, model: str | None, host: str | None, path: str | None, client: str | None) -> bool:
        values = {"model": model, "host": host, "path": path, "client": client}
        for key, glob in self.match.items():
            value = values.get(key) or ""
            if key == "host":
                value, glob = value.lower(), glob.lower()
            if not fnmatch.fnmatchcase(value, glob):
                return False
        return True


# Well-known LLM APIs, each with the base URL its own SDK uses. Their hosts are the ones the
# proxy listener decrypts; a rules file may redefine any of them by name.
BUILTIN_PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("openai", "https://api.openai.com/v1", "openai", "OPENAI_API_KEY", builtin=True),
        Provider("openrouter", "https://openrouter.ai/api/v1", "openai", "OPENROUTER_API_KEY", builtin=True),
        Provider("anthropic", "https://api.anthropic.com", "anthropic", "ANTHROPIC_API_KEY", builtin=True),
        Provider("gemini", "https://generativelanguage.googleapis.com", "gemini", "GEMINI_API_KEY", builtin=True),
        Provider("deepseek", "https://api.deepseek.com", "openai", "DEEPSEEK_API_KEY", builtin=True),
        Provider("mistral", "https://api.mistral.ai/v1", "openai", "MISTRAL_API_KEY", builtin=True),
        Provider("groq", "https://api.groq.com/openai/v1", "openai", "GROQ_API_KEY", builtin=True),
        Provider("together", "https://api.together.xyz/v1", "openai", "TOGETHER_API_KEY", builtin=True),
        Provider("xai", "https://api.x.ai/v1", "openai", "XAI_API_KEY", builtin=True),
        Provider("fireworks", "https://api.fireworks.ai/inference/v1", "openai", "FIREWORKS_API_KEY", builtin=True),
        Provider("cerebras", "https://api.cerebras.ai/v1", "openai", "CEREBRAS_API_KEY", builtin=True),
        Provider("perplexity", "https://api.perplexity.ai", "openai", "PERPLEXITY_API_KEY", builtin=True),
        Provider("ollama", "http://127.0.0.1:11434", "ollama", builtin=True),
    )
}


@dataclass(frozen=True, slots=True)
class Rules:
    providers: Mapping[str, Provider]
    routes: tuple[Route, ...] = ()
    source: str | None = None
    cooldown_s: float = 30.0

    def provider_for_url(self, scheme: str, host: str, port: int, path: str,
                         api: str | None = None) -> tuple[Provider, str] | None:
        """The provider whose base URL the request falls under, and the path after it.

        The longest base path wins, then one speaking the request's `api` (one server may
        serve several formats), then a user's own provider over a built-in one.
        """
        best: tuple[int, bool, bool, Provider] | None = None
        host = host.lower()
        for p in self.providers.values():
            if p.host.lower() != host or p.port != port or p.scheme != scheme:
                continue
            base = p.base_path
            if base and not (path == base or path.startswith(base + "/")):
                continue
            rank = (len(base), p.api == api, not p.builtin)
            if best is None or rank > best[:3]:
                best = (*rank, p)
        if best is None:
            return None
        provider = best[3]
        return provider, path[len(provider.base_path):] or "/"

    def match(self, *, model: str | None, host: str | None, path: str | None, client: str | None,
              api: str | None = None) -> Route | None:
        """The first route whose every glob matches, or None (the call goes where it was sent).

        A route whose targets speak another wire format than the request is skipped: an
        Anthropic request cannot be sent to an OpenAI-format target whatever its model says.
        """
        for route in self.routes:
            if api is not None and route.api is not None and route.api != api:
                continue
            if route.matches(model=model, host=host, path=path, client=client):
                return route
        return None

    def intercept_addresses(self) -> set[tuple[str, int]]:
        """(host, port) pairs the proxy listener decrypts: every provider's, built-in and
        configured. By port too, so a local model server does not make all of 127.0.0.1 ours."""
        return {(p.host.lower(), p.port) for p in self.providers.values() if p.host}


def default_rules() -> Rules:
    """No rules file: the built-in providers, every call passed through as addressed."""
    return Rules(providers=dict(BUILTIN_PROVIDERS))


def load_rules(path: Path) -> Rules:
    return parse_rules(read_rules_text(path), str(path))


def read_rules_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError([f"{path}: cannot read it ({exc})"], str(path)) from None


# -- parsing ------------------------------------------------------------------------------------
class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []
        self._constructor = yaml.SafeLoader("")

    def problem(self, node: yaml.Node | None, message: str) -> None:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        self.problems.append(f"{self.source}{line}: {message}")

    def scalar(self, node: yaml.Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """A mapping's entries by key (key node, value node); unknown and repeated keys reported."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{what} must be a mapping ({', '.join(allowed)})")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            # Keys as written: YAML 1.1 would read the key `on` (retry.on) as True.
            key = knode.value if isinstance(knode, yaml.ScalarNode) else "?"
            if key in out:
                self.problem(knode, f"{what}: `{key}` appears twice; keep one")
                continue
            if allowed and key not in allowed:
                self.problem(knode, f"{what}: unknown key `{key}`{_suggest(key, allowed)}")
                continue
            out[key] = (knode, vnode)
        return out

    def string(self, node: yaml.Node, what: str) -> str | None:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, str) or not value:
            self.problem(node, f"{what} must be a non-empty string")
            return None
        return value

    def number(self, node: yaml.Node, what: str, *, low: float, high: float, integer: bool = False) -> float | None:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if not ok or value is None or isinstance(value, bool) or not (low <= value <= high):
            kind = "a whole number" if integer else "a number"
            self.problem(node, f"{what} must be {kind} from {low:g} to {high:g}, got {value!r}")
            return None
        return value


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean `{close[0]}`?" if close else f"; expected one of: {', '.join(options)}"


def parse_rules(text: str, source: str = "rules.yaml") -> Rules:
    """Rules from YAML text; raises RulesError listing every problem with its line."""
    p = _Parser(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise RulesError([f"{source}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}"], source) from None
    if root is None:
        what = "is empty" if not text.strip() else "holds nothing but comments"
        raise EmptyRulesError([f"{source}: the file {what}. Write your providers and routes in it; "
                               "for the built-in providers and no routes write `routes: []`, or "
                               "remove the file"], source)
    top = p.mapping(root, "the top level", ("providers", "routes", "cooldown_s"))
    if top is None:
        raise RulesError(p.problems, source)

    providers: dict[str, Provider] = dict(BUILTIN_PROVIDERS)
    if "providers" in top:
        _parse_providers(p, top["providers"][1], providers)
    routes: list[Route] = []
    if "routes" in top:
        routes = _parse_routes(p, top["routes"][1], providers)
    cooldown = 30.0
    if "cooldown_s" in top:
        cooldown = p.number(top["cooldown_s"][1], "cooldown_s", low=0, high=86400) or 0.0
    if p.problems:
        raise RulesError(p.problems, source)
    return Rules(providers=providers, routes=tuple(routes), source=source, cooldown_s=float(cooldown))


PROVIDER_KEYS = ("base_url", "api", "key_env", "headers", "price")


def _parse_providers(p: _Parser, node: yaml.Node, providers: dict[str, Provider]) -> None:
    entries = p.mapping(node, "providers", ())
    for name, (knode, vnode) in (entries or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            p.problem(knode, f"provider name `{name}` must be letters, digits, '-', '_' or '.' "
                             "(it becomes the gateway's first path segment)")
            continue
        what = f"provider `{name}`"
        if isinstance(vnode, yaml.MappingNode):
            for k2, _ in vnode.value:
                if isinstance(k2, yaml.ScalarNode) and k2.value in ("key", "api_key", "token"):
                    p.problem(k2, f"{what}: do not put a key in rules.yaml; write `key_env: NAME` and "
                                  "export NAME in the environment of `llmtap run`")
            vnode = yaml.MappingNode(vnode.tag, [(k, v) for k, v in vnode.value
                                                 if not (isinstance(k, yaml.ScalarNode)
                                                         and k.value in ("key", "api_key", "token"))],
                                     vnode.start_mark, vnode.end_mark)
        fields = p.mapping(vnode, what, PROVIDER_KEYS)
        if fields is None:
            continue
        base = BUILTIN_PROVIDERS.get(name)
        values: dict[str, Any] = {}
        if "base_url" in fields:
            url = p.string(fields["base_url"][1], f"{what}: base_url")
            if url is not None:
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    p.problem(fields["base_url"][1], f"{what}: base_url {url!r} must be an http(s) URL, "
                                                     "e.g. https://api.openai.com/v1")
                elif parts.query or parts.fragment:
                    p.problem(fields["base_url"][1], f"{what}: base_url must not carry a query or fragment")
                else:
                    values["base_url"] = url.rstrip("/")
        elif base is None:
            p.problem(vnode, f"{what}: base_url is missing; write the URL you would give its own SDK, "
                             "e.g. base_url: https://api.openai.com/v1")
        if "api" in fields:
            api = p.string(fields["api"][1], f"{what}: api")
            if api is not None and api not in APIS:
                p.problem(fields["api"][1], f"{what}: api `{api}` is not known{_suggest(api, APIS)}")
            elif api is not None:
                values["api"] = api
        elif base is None:
            p.problem(vnode, f"{what}: api is missing; one of {', '.join(APIS)}")
        if "key_env" in fields:
            env = p.string(fields["key_env"][1], f"{what}: key_env")
            if env is not None and not _ENV_NAME.fullmatch(env):
                p.problem(fields["key_env"][1], f"{what}: key_env names an environment variable "
                                                f"(e.g. OPENAI_API_KEY), not {env!r}")
            elif env is not None:
                values["key_env"] = env
        if "headers" in fields:
            hnode = fields["headers"][1]
            hs = p.mapping(hnode, f"{what}: headers", ())
            headers: dict[str, str] = {}
            for hname, (_, hv) in (hs or {}).items():
                value = p.scalar(hv) if isinstance(hv, yaml.ScalarNode) else None
                if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                    p.problem(hv, f"{what}: header `{hname}` must have a text value")
                else:
                    headers[hname] = str(value)
            values["headers"] = headers
        if "price" in fields:
            _check_price(p, name, fields["price"][1])
        if base is not None:
            merged: dict[str, Any] = {"base_url": base.base_url, "api": base.api, "key_env": base.key_env, "headers": {}}
            merged.update(values)
            values = merged
        if {"base_url", "api"} <= values.keys():
            providers[name] = Provider(name=name, base_url=values["base_url"], api=values["api"],
                                       key_env=values.get("key_env"), headers=values.get("headers", {}))


def _check_price(p: _Parser, provider: str, node: yaml.Node) -> None:
    """A provider's `price`, checked by the recorder's own reader of it (the recorder prices
    calls and may not import this module), each problem on the line of the model it concerns."""
    from llmtap.recorder.pricerules import parse_price

    try:
        value = p.scalar(node)
    except yaml.YAMLError as exc:
        p.problem(node, f"provider `{provider}`: price: {exc}")
        return
    lines: dict[str, yaml.Node] = {}
    if isinstance(node, yaml.MappingNode):
        lines = {k.value: k for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    for glob, message in parse_price(provider, value)[1]:
        p.problem(lines.get(glob, node) if glob is not None else node, message)


ROUTE_KEYS = ("name", "match", "targets", "retry", "timeout")
MATCH_KEYS = ("model", "host", "path", "client")


def _parse_routes(p: _Parser, node: yaml.Node, providers: dict[str, Provider]) -> list[Route]:
    if not isinstance(node, yaml.SequenceNode):
        p.problem(node, "routes must be a list; each item starts with `- match: {model: \"...\"}`")
        return []
    routes: list[Route] = []
    names: set[str] = set()
    for i, rnode in enumerate(node.value, 1):
        fields = p.mapping(rnode, f"route {i}", ROUTE_KEYS)
        if fields is None:
            continue
        name = f"route {i}"
        if "name" in fields:
            name = p.string(fields["name"][1], f"route {i}: name") or name
            if name in names:
                p.problem(fields["name"][1], f"route name `{name}` is used twice; names must be unique")
            names.add(name)
        what = f"route `{name}`"

        match: dict[str, str] = {}
        if "match" not in fields:
            p.problem(rnode, f"{what}: match is missing; e.g. match: {{model: \"gpt-4o*\"}} "
                             "(model: \"*\" matches every call)")
        else:
            entries = p.mapping(fields["match"][1], f"{what}: match", MATCH_KEYS)
            for key, (_, gnode) in (entries or {}).items():
                glob = p.string(gnode, f"{what}: match.{key}")
                if glob is None:
                    continue
                bad = _bad_glob(glob)
                if bad:
                    p.problem(gnode, f"{what}: match.{key} {glob!r} is not a valid glob: {bad}")
                else:
                    match[key] = glob
            # A match whose every key was unknown was reported as such already.
            if entries is not None and not entries and not fields["match"][1].value:
                p.problem(fields["match"][1], f"{what}: match is empty; write model: \"*\" to match every call")

        targets: list[Target] = []
        if "targets" not in fields:
            p.problem(rnode, f"{what}: targets is missing; e.g. targets: [{{provider: openai, model: gpt-4o}}]")
        else:
            targets = _parse_targets(p, fields["targets"][1], what, providers)

        retry = Retry()
        if "retry" in fields:
            retry = _parse_retry(p, fields["retry"][1], what)
        timeout = Timeout()
        if "timeout" in fields:
            entries = p.mapping(fields["timeout"][1], f"{what}: timeout", ("connect_s", "first_byte_s"))
            values = {k: p.number(v, f"{what}: timeout.{k}", low=0.01, high=86400)
                      for k, (_, v) in (entries or {}).items()}
            timeout = Timeout(**{k: float(v) for k, v in values.items() if v is not None})
        routes.append(Route(name=name, match=match, targets=tuple(targets), retry=retry, timeout=timeout,
                            line=rnode.start_mark.line + 1,
                            api=providers[targets[0].provider].api if targets else None))
    return routes


def _parse_targets(p: _Parser, node: yaml.Node, what: str, providers: dict[str, Provider]) -> list[Target]:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        p.problem(node, f"{what}: targets must be a non-empty list, e.g. [{{provider: openai, model: gpt-4o}}]")
        return []
    targets: list[Target] = []
    apis: dict[str, str] = {}
    for tnode in node.value:
        fields = p.mapping(tnode, f"{what}: target", ("provider", "model"))
        if fields is None:
            continue
        if "provider" not in fields:
            p.problem(tnode, f"{what}: a target needs `provider:` (one of {', '.join(sorted(providers))})")
            continue
        pnode = fields["provider"][1]
        pname = p.string(pnode, f"{what}: target provider")
        if pname is None:
            continue
        if pname not in providers:
            p.problem(pnode, f"{what}: unknown provider `{pname}`{_suggest(pname, sorted(providers))}; "
                             "define it under providers:")
            continue
        model = p.string(fields["model"][1], f"{what}: target model") if "model" in fields else None
        api = providers[pname].api
        if apis and api not in apis:
            first_api, first_name = next(iter(apis.items()))
            p.problem(pnode, f"{what}: provider `{pname}` speaks api `{api}` but `{first_name}` speaks "
                             f"`{first_api}`; a route's targets must share one wire format (split it into "
                             "one route per api)")
        apis.setdefault(api, pname)
        targets.append(Target(provider=pname, model=model))
    return targets


def _parse_retry(p: _Parser, node: yaml.Node, what: str) -> Retry:
    entries = p.mapping(node, f"{what}: retry", ("attempts", "backoff_ms", "on", "retry_after_cap_s"))
    if entries is None:
        return Retry()
    kw: dict[str, Any] = {}
    if "attempts" in entries:
        v = p.number(entries["attempts"][1], f"{what}: retry.attempts", low=1, high=20, integer=True)
        if v is not None:
            kw["attempts"] = int(v)
    if "backoff_ms" in entries:
        v = p.number(entries["backoff_ms"][1], f"{what}: retry.backoff_ms", low=0, high=600_000, integer=True)
        if v is not None:
            kw["backoff_ms"] = int(v)
    if "retry_after_cap_s" in entries:
        v = p.number(entries["retry_after_cap_s"][1], f"{what}: retry.retry_after_cap_s", low=0, high=3600)
        if v is not None:
            kw["retry_after_cap_s"] = float(v)
    if "on" in entries:
        onode = entries["on"][1]
        words: list[str] = []
        items = onode.value if isinstance(onode, yaml.SequenceNode) else None
        if items is None:
            p.problem(onode, f"{what}: retry.on must be a list, e.g. [connect, timeout, 429, 5xx]")
        for item in items or []:
            word = item.value.lower() if isinstance(item, yaml.ScalarNode) else ""
            if word in RETRY_WORDS or _STATUS_WORD.fullmatch(word):
                words.append(word)
            else:
                p.problem(item, f"{what}: retry.on `{word}` is not a failure kind; use connect, timeout, "
                                "a status like 429 or a class like 5xx")
        kw["on"] = tuple(words)
    return Retry(**kw)


def _bad_glob(glob: str) -> str | None:
    """fnmatch silently treats an unclosed `[` as a literal; a user almost never means that."""
    i = 0
    while i < len(glob):
        if glob[i] == "[":
            start = i + 2 if i + 1 < len(glob) and glob[i + 1] in "!]" else i + 1
            close = glob.find("]", start)
            if close < 0:
                return f"the `[` at position {i + 1} is never closed (write `[[]` for a literal bracket)"
            i = close
        i += 1
    return None


# -- `llmtap rules check` -----------------------------------------------------------------------
def add_rules_parser(sub: argparse._SubParsersAction) -> None:
    from llmtap import paths

    rules = sub.add_parser("rules", help="check a rules.yaml", description="Work with rules.yaml.")
    rsub = rules.add_subparsers(dest="rules_command", metavar="SUBCOMMAND", required=True)
    check = rsub.add_parser(
        "check",
        help="validate a rules file and show what it routes",
        description="Validate a rules file: an empty file, unknown keys, bad globs, unknown providers "
        "targets that speak another wire format and malformed prices (a provider's `price:`) are reported "
        "with file:line and what to write instead. "
        "Exit code 0 when valid, 2 when not.",
        epilog="example: llmtap rules check ./rules.yaml",
    )
    check.add_argument("path", nargs="?", type=Path, default=None,
                       help="the file (default: ./rules.yaml if present, else "
                       f"{paths.config_dir() / 'rules.yaml'})")
    check.set_defaults(func=_cmd_check)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _price_summary(prices: Any) -> str:
    if len(prices.models) == 1 and prices.models[0].glob == "*" and prices.models[0].free:
        return "free"
    return ", ".join(f"{m.glob} free" if m.free else f"{m.glob} ${m.input}/${m.output} per million in/out"
                     for m in prices.models)


def _cmd_check(args: argparse.Namespace) -> int:
    from llmtap import paths

    path: Path = args.path or paths.default_rules()
    if not path.is_file():
        print(f"llmtap rules check: {path}: no such file", file=sys.stderr)
        return 2
    try:
        rules = load_rules(path)
    except RulesError as exc:
        print(exc, file=sys.stderr)
        return 2
    own = [p for p in rules.providers.values() if not p.builtin]
    print(f"{path}: OK, {_plural(len(own), 'provider')} of its own (+{len(rules.providers) - len(own)} "
          f"built in), {_plural(len(rules.routes), 'route')}")
    builtin = sorted(p.name for p in rules.providers.values() if p.builtin)
    if builtin:
        print(f"  built-in providers: {', '.join(builtin)}")
    from llmtap.recorder.pricerules import read_rules_prices

    priced = read_rules_prices(path).prices or {}
    if priced:
        print("  prices: " + "; ".join(f"{name} {_price_summary(pp)}" for name, pp in priced.items()))
    for route in rules.routes:
        globs = " ".join(f"{k}={v}" for k, v in route.match.items())
        chain = " → ".join(f"{t.provider}:{t.model or '(as asked)'}" for t in route.targets)
        print(f"  {route.name}: {globs}  ⇒  {chain}")
    return 0
