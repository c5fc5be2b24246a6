"""Which dialect a request speaks, and the one place that lists the dialect modules.

Adding a wire format is one module beside this one (a `Dialect` and its `ResponseReader`, listed
in the module's `DIALECTS`) plus its fixtures in tests/fixtures/wire, and its name in `MODULES`
below. A variant of a format (another path of the same provider) is one more entry in its own
module's `DIALECTS`, and nothing here changes.
"""

from __future__ import annotations

import importlib
from typing import Any

from llmtap.dialects.base import Dialect, ResponseReader, State, load_body, norm_error
from llmtap.dialects.framing import DEFAULT_BODY_LIMIT, BodyReader, Headers
from llmtap.dialects.shapes import Request

# The dialect modules, in the order requests are matched and answers of unknown calls guessed.
MODULES = ("openai_chat", "openai_responses", "anthropic", "ollama", "gemini")

OTHER = "other"  # the `api` of a request no dialect recognises


def _load() -> tuple[Dialect, ...]:
    found: list[Dialect] = []
    for name in MODULES:
        module = importlib.import_module(f"llmtap.dialects.{name}")
        found.extend(module.DIALECTS)
    return tuple(found)


DIALECTS: tuple[Dialect, ...] = _load()
_BY_NAME: dict[str, Dialect] = {d.name: d for d in DIALECTS}


def names() -> tuple[str, ...]:
    """Every dialect's `api` name, then "other"."""
    return (*_BY_NAME, OTHER)


class _AutoReader(ResponseReader):
    """For answers of calls no dialect recognised: the first reader whose format the first
    familiar object looks like reads them all."""

    has_terminator = False
    known = False

    def __init__(self, st: State) -> None:
        super().__init__(st)
        self.inner: ResponseReader | None = None

    def _pick(self, name: str | None, obj: Any) -> ResponseReader | None:
        o = obj[0] if isinstance(obj, list) and obj else obj
        if not isinstance(o, dict):
            return None
        for d in DIALECTS:
            if d.reader.claims(name, o):
                return d.reader(self.st)
        return None

    def event(self, name: str | None, obj: Any) -> None:
        if self.inner is None:
            self.inner = self._pick(name, obj)
            if self.inner is None:
                return
            self.has_terminator = True
        self.inner.event(name, obj)

    def whole(self, obj: Any) -> None:
        inner = self._pick(None, obj)
        if inner is not None:
            inner.whole(obj)
        elif isinstance(obj, dict) and obj.get("error"):
            self.st.fail(norm_error(obj, None))
        else:
            self.st.complete = True

    def finalize(self) -> None:
        if self.inner is not None:
            self.inner.finalize()


class Other(Dialect):
    """A request no dialect recognises: passed on as it is, its answer read by whichever format
    it looks like, its body shown as the format it looks like."""

    name = OTHER
    family = OTHER
    reader = _AutoReader

    def error_body(self, status: int, message: str, code: str, attempts: list[dict] | None = None) -> bytes:
        return for_family("openai").error_body(status, message, code, attempts)

    def read_request(self, body: bytes | str | dict | None, path: str = "") -> Request:
        doc, notes = load_body(body)
        guess = guess_body(doc) if isinstance(doc, dict) else None
        if guess is None:
            model = doc.get("model") if isinstance(doc, dict) else None
            return Request(OTHER, model=model if isinstance(model, str) else None, notes=tuple(notes))
        read = guess.read_request(doc, path)
        return Request(OTHER, model=read.model, stream=read.stream, system=read.system, messages=read.messages,
                       tools=read.tools, tool_choice=read.tool_choice, params=read.params, ids=read.ids,
                       notes=(*read.notes, f"read as {guess.name}: its path is not one llmtap knows"))


OTHER_DIALECT = Other()


def _path(path: str) -> str:
    return (path or "").split("?", 1)[0].rstrip("/")


def detect(method: str, path: str) -> Dialect:
    """The dialect of a request from its method and URL path (any gateway or base prefix), or
    the `other` dialect. Decided from the path alone so that the proxy can classify a call before
    reading its body, and a body that is not JSON still gets the right `api`. Never raises."""
    try:
        m, p = (method or "").upper(), _path(path)
        for d in DIALECTS:
            if d.matches(m, p):
                return d
    except Exception:
        pass
    return OTHER_DIALECT


def get(api: str | None) -> Dialect:
    """The dialect named `api` (a `calls.api` value); `other` for any name not known."""
    return _BY_NAME.get(api or "", OTHER_DIALECT)


def for_family(family: str | None) -> Dialect:
    """The dialect that speaks for a family (rules.yaml's provider `api`: its error shape, how a
    key is sent): the family's first; Chat Completions for any family not known."""
    for d in DIALECTS:
        if d.family == family:
            return d
    return DIALECTS[0]


def guess_body(doc: dict) -> Dialect | None:
    """The dialect a request body looks like, by its keys (for calls recorded as `other`)."""
    # Anthropic's marks are more specific than Chat Completions' `messages`: asked first.
    ordered = sorted(DIALECTS, key=lambda d: d.family != "anthropic")
    for d in ordered:
        try:
            if d.claims_body(doc):
                return d
        except Exception:
            continue
    return None


def credential_headers() -> frozenset[str]:
    """Every header any format carries a client's credentials in."""
    out: frozenset[str] = frozenset()
    for d in DIALECTS:
        out |= d.credential_headers
    return out


def read_request(api: str | None, body: bytes | str | dict | None, path: str = "") -> Request:
    """A request body of dialect `api` as the normalised Request. Never raises: what could not
    be read is in its notes."""
    dialect = get(api)
    try:
        return dialect.read_request(body, path)
    except Exception as exc:
        return Request(dialect.name, notes=(f"request could not be read: {type(exc).__name__}: {exc}",))


def response_reader(api: str | None, *, status: int | None, headers: Headers,
                    limit: int = DEFAULT_BODY_LIMIT) -> BodyReader:
    """A reader of one response body of dialect `api`: feed it the bytes as they arrived, then
    `finish()` gives the shapes.Response (`snapshot()` what is known so far)."""
    dialect = get(api)
    return BodyReader(dialect.name, dialect.reader, status, headers, limit)
