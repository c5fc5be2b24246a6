"""What a call cost, in USD, as an exact decimal: from the provider's own figure, rules.yaml,
or pydantic's genai-prices (its bundled price table, offline; `llmtap prices update` fetches a
newer one only when asked).

In that order:
1. the provider stated the cost itself (OpenRouter's `usage.cost`): that figure, as sent;
2. rules.yaml gives the provider a `price` (see pricerules.py): its per-million prices;
3. genai-prices knows the provider -- by llmtap's provider name, or, for a provider rules.yaml
   points at a URL of its own, by that URL -- and the model, at the call's date: its prices;
4. otherwise the call is not priced (`cost_source` 'unknown', the reason in `cost_detail`):
   never a guess by model name alone (a local "llama3" is not some cloud's llama3).

Pricing runs on the recorder's writer for every finished call, so it must cost microseconds:
genai-prices takes ~0.3 ms per `calc_price`, so the prices of a (provider, model, UTC date) are
looked up once and the arithmetic done here -- the linear sum genai-prices itself does for the
four token kinds llmtap counts, tiers by input size included. Where that is not safe (a price
that depends on the time of day, such as DeepSeek's off-peak hours, or a price per request)
genai-prices is called for each call; the first call of every cached entry is
also priced by genai-prices and must agree, or the entry is never taken from the cache.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from llmtap.dialects.shapes import Usage
from llmtap.recorder.pricerules import ModelPrice, RulesPrices, RulesWatch

log = logging.getLogger("llmtap.recorder")

MILLION = Decimal(1_000_000)
# llmtap's built-in provider names that genai-prices spells otherwise.
GENAI_PROVIDER = {"gemini": "google", "xai": "x-ai"}
# Providers that run on your own machine: never priced by a cloud's table.
LOCAL_PROVIDERS = frozenset({"ollama"})
# genai-prices' price keys of the token kinds llmtap counts, and llmtap's names for them.
_KINDS = {"input_mtok": "input", "output_mtok": "output", "cache_read_mtok": "cache_read",
          "cache_write_mtok": "cache_write", "cache_write_1h_mtok": "cache_write_1h"}
# Every other price key is of a unit llmtap's usage never reports (audio, images, web
# searches...), which costs nothing in genai-prices' own sum either; except this one, a price
# per request, which genai-prices adds to every call.
_PER_REQUEST = "requests_kcount"
UNKNOWN = "unknown"


class Priced:
    """A call's cost: `cost_usd` None when unknown; `source` says where it came from ('provider',
    'rules.yaml', 'genai-prices 0.2.3', 'unknown'); `detail` what re-pricing needs (the price
    entry used: provider, model, table, per-million prices, date), as a dict and as the JSON the
    column holds (made once per price entry, not per call)."""

    __slots__ = ("cost_usd", "source", "_detail", "_text")

    def __init__(self, cost_usd: Decimal | None, source: str | None, detail: dict[str, Any] | None = None,
                 text: str | None = None) -> None:
        self.cost_usd = cost_usd
        self.source = source
        self._detail = detail
        self._text = text

    @property
    def detail(self) -> dict[str, Any] | None:
        if self._detail is None and self._text is not None:
            self._detail = json.loads(self._text)
        return self._detail

    def detail_json(self) -> str | None:
        if self._text is None and self._detail is not None:
            self._text = json.dumps(self._detail, sort_keys=True)
        return self._text


NOT_PRICED = Priced(None, None, None)  # no usage reported: nothing to price


@dataclass(slots=True)
class _Entry:
    """The prices of one (provider, model, date): per million tokens, with tiers by input size."""

    provider: str
    model: str
    kinds: dict[str, tuple[Decimal, tuple[tuple[int, Decimal], ...]]]  # kind -> (base, ((start, price), ...))
    model_price: Any  # genai-prices' ModelPrice, for the calls not priced here
    exact: bool  # this module's arithmetic gives genai-prices' result
    checked: bool = False  # one call was priced both ways and agreed
    texts: dict[tuple[str, ...], str] = field(default_factory=dict)  # cost_detail by the prices used
    # (input, output, cache_read, cache_write, cache_write_1h) when no tier applies
    flat: tuple[Decimal, ...] | None = None
    flat_used: tuple[str, ...] = ()


def _tokens(usage: Usage) -> tuple[int, int, int, int]:
    """(uncached input, output, cache read, cache write): input_tokens includes the cache's."""
    read = usage.cache_read_tokens or 0
    write = usage.cache_write_tokens or 0
    total_in = usage.input_tokens or 0
    return max(total_in - read - write, 0), usage.output_tokens or 0, read, write


def _hour_writes(usage: Usage, write: int) -> int:
    """Of the cache writes, those for an hour (Anthropic's), never more than the writes."""
    return min(usage.cache_write_1h_tokens or 0, write)


Kinds = dict[str, tuple[Decimal, tuple[tuple[int, Decimal], ...]]]  # kind -> (base, ((start, price), ...))


def _linear(kinds: Kinds, usage: Usage) -> tuple[Decimal, tuple[str, ...]]:
    """Σ tokens × price-per-million / 1e6 (a tier applies when all input tokens exceed its
    start), and the prices used, kind by kind, as text. On the writer for every call: lean."""
    read = usage.cache_read_tokens or 0
    write = usage.cache_write_tokens or 0
    total_in = usage.input_tokens or 0
    out = usage.output_tokens or 0
    # An hour's writes at their own price where the entry has one, else as any write.
    hour = _hour_writes(usage, write) if "cache_write_1h" in kinds else 0
    cost = Decimal(0)
    used = []
    for kind, (price, tiers) in kinds.items():
        for start, tier_price in reversed(tiers) if tiers else ():
            if total_in > start:
                price = tier_price
                break
        used.append(price)
        n = (out if kind == "output" else read if kind == "cache_read" else write - hour if kind == "cache_write"
             else hour if kind == "cache_write_1h" else max(total_in - read - write, 0))
        if n:
            cost += price * n
    return cost.scaleb(-6), tuple(map(str, used))


class Pricer:
    """Prices finished calls; one per recorder (its writer thread calls `price`)."""

    def __init__(self, rules_path: Path | None = None, prices_file: Path | None = None) -> None:
        self.rules = RulesWatch(rules_path)
        self.prices_file = prices_file
        self._snapshot: Any = None
        self._source = ""
        self._version = ""
        self._cache: dict[tuple[str, str, str | None, date], _Entry | str] = {}
        self._lock = threading.Lock()
        self._fast: dict[tuple[Any, ...], tuple[RulesPrices, _Entry, str]] = {}
        self._broken = ""  # why genai-prices could not be loaded, once it could not

    # -- genai-prices, loaded once -----------------------------------------------------------------
    def _load(self) -> Any:
        """genai-prices' table: the one `llmtap prices update` saved, else the bundled one. Never
        genai-prices' own updater (that would fetch from the network)."""
        if self._snapshot is not None:
            return self._snapshot
        with self._lock:
            if self._snapshot is not None:
                return self._snapshot
            import genai_prices
            from genai_prices import data_snapshot

            snapshot, fetched = None, None
            if self.prices_file is not None and self.prices_file.is_file():
                try:
                    snapshot, fetched = load_prices_file(self.prices_file)
                except Exception as exc:  # a bad saved table costs the update, never pricing
                    log.error("llmtap recorder: cannot read the prices %s saved by `llmtap prices update` (%s); "
                              "using the table genai-prices %s ships with. Run `llmtap prices update` again, "
                              "or delete the file.", self.prices_file, exc, genai_prices.__version__)
            if snapshot is None:
                snapshot = data_snapshot._bundled_snapshot()
            self._version = genai_prices.__version__
            self._source = f"genai-prices {self._version}" + (f" (table fetched {fetched})" if fetched else "")
            self._snapshot = snapshot
            return snapshot

    def warm(self) -> None:
        """Load genai-prices ahead of the first call (~0.4 s of imports), off the writer; a
        failure is said by the first call that needs the table. At the lowest CPU priority:
        `llmtap run` is starting meanwhile, and its own imports must not wait behind these."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only, on Linux
        except (AttributeError, OSError):
            pass
        try:
            self._load()
        except Exception:
            pass

    # -- pricing -------------------------------------------------------------------------------------
    def price(self, usage: Usage | None, *, provider: str | None, models: tuple[str | None, ...],
              url: str | None, when: datetime) -> Priced:
        """The cost of one call. `models`: the names to try, best first (the model that answered,
        then the one sent, then the one asked for)."""
        if usage is None:
            return NOT_PRICED
        if usage.cost_usd is not None:
            return Priced(usage.cost_usd, "provider", {"provider_cost": str(usage.cost_usd), "provider": provider})
        if usage.input_tokens is None and usage.output_tokens is None:
            return NOT_PRICED
        rules = self.rules.refresh()
        day = when.date() if when.tzinfo is UTC else _utc(when).date()
        # Most calls repeat a (provider, models, day) seen before: one lookup to its price entry.
        fast = self._fast.get((provider, models, url if provider is None else None, day))
        if fast is not None and fast[0] is rules:
            return self._entry_priced(fast[1], usage, fast[2], when)
        if rules.prices and provider in rules.prices:
            entry = rules.prices[provider].find(*models)
            if entry is not None:
                return self._rules_priced(entry, usage, provider, rules, when)
        return self._table_priced(usage, provider, models, url, when, rules)

    def _rules_priced(self, entry: ModelPrice, usage: Usage, provider: str, rules: RulesPrices,
                      when: datetime) -> Priced:
        kinds: Kinds = {k: (getattr(entry, k), ()) for k in ("input", "output", "cache_read", "cache_write")}
        cost, used = _linear(kinds, usage)
        return Priced(cost, "rules.yaml", {"rules": rules.source, "provider": provider, "model_glob": entry.glob,
                                           "per_million": dict(zip(kinds, used)),
                                           "date": _utc(when).date().isoformat()})

    def _table_priced(self, usage: Usage, provider: str | None, models: tuple[str | None, ...], url: str | None,
                      when: datetime, rules: RulesPrices) -> Priced:
        if provider in LOCAL_PROVIDERS and not (rules.base_urls and provider in rules.base_urls):
            return _unknown(f"provider {provider} runs locally: give it `price: free` (or prices) in rules.yaml")
        own_url = rules.base_urls.get(provider) if (rules.base_urls and provider) else None
        # A provider rules.yaml points at a URL is known by that URL; a built-in one by its name.
        if own_url is not None:
            key_provider, key_url = None, own_url
        elif provider is not None:
            key_provider, key_url = GENAI_PROVIDER.get(provider, provider), None
        elif url and not _loopback(url):
            key_provider, key_url = None, url
        else:
            return _unknown("no provider known for this call")
        day = _utc(when).date()
        names = [m for m in dict.fromkeys(models) if m]
        if not names:
            return _unknown("no model name in the call")
        reasons = []
        for model in names:
            entry = self._entry(key_provider, key_url, model, day, when)
            if isinstance(entry, str):
                reasons.append(entry)
                continue
            if entry.exact and len(self._fast) < 100_000:
                self._fast[(provider, models, url if provider is None else None, day)] = (rules, entry, model)
            return self._entry_priced(entry, usage, model, when)
        return _unknown(reasons[0])

    def _entry(self, provider_id: str | None, url: str | None, model: str, day: date,
               when: datetime) -> _Entry | str:
        key = (provider_id or "", model.lower(), url, day)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if self._broken:
            return self._broken
        try:
            snapshot = self._load()
        except Exception as exc:  # said once; every call after is left unpriced with the reason
            self._broken = f"genai-prices cannot be loaded ({type(exc).__name__}: {exc})"
            log.error("llmtap recorder: %s; calls are priced by rules.yaml and providers' own figures only",
                      self._broken)
            return self._broken
        try:
            gp, gm = snapshot.find_provider_model(model, None, provider_id, url)
        except LookupError:
            where = f"provider {provider_id}" if provider_id else f"the URL {url}"
            miss = f"{self._source} has no price for model {model} of {where}"
            if len(self._cache) < 100_000:
                self._cache[key] = miss
            return miss
        model_price = gm.get_prices(_utc(when))
        kinds: dict[str, tuple[Decimal, tuple[tuple[int, Decimal], ...]]] = {}
        exact = not _time_of_day(gm)
        for name, value in model_price.__dict__.items():
            if value is None or name.startswith("_"):
                continue
            kind = _KINDS.get(name)
            if kind is None:
                if name == _PER_REQUEST:
                    exact = False
                continue
            if isinstance(value, Decimal):
                kinds[kind] = (value, ())
            elif hasattr(value, "tiers") and isinstance(getattr(value, "base", None), Decimal):
                kinds[kind] = (value.base, tuple((int(t.start), t.price) for t in value.tiers))
            else:
                exact = False
        entry = _Entry(gp.id, gm.id, kinds, model_price, exact)
        if not any(tiers for _, tiers in kinds.values()):  # no tiers: the same prices for every call
            zero = Decimal(0)
            entry.flat = tuple(kinds[k][0] if k in kinds else zero for k in ("input", "output", "cache_read",
                                                                               "cache_write", "cache_write_1h"))
            entry.flat_used = tuple(str(base) for base, _ in kinds.values())
        if exact and len(self._cache) < 100_000:  # a time-of-day price is never cached by date
            self._cache[key] = entry
        return entry

    def _entry_priced(self, entry: _Entry, usage: Usage, model: str, when: datetime) -> Priced:
        cost: Decimal | None
        flat = entry.flat
        if flat is not None and entry.checked:  # the common case, kept short
            read = usage.cache_read_tokens or 0
            write = usage.cache_write_tokens or 0
            hour = _hour_writes(usage, write) if "cache_write_1h" in entry.kinds else 0
            plain = max((usage.input_tokens or 0) - read - write, 0)
            cost = (flat[0] * plain + flat[1] * (usage.output_tokens or 0) + flat[2] * read
                    + flat[3] * (write - hour) + flat[4] * hour).scaleb(-6)
            return Priced(cost, self._source, text=entry.texts.get(entry.flat_used) or self._detail_text(
                entry, entry.flat_used, model, when))
        cost, used = _linear(entry.kinds, usage)
        if not (entry.exact and entry.checked):
            theirs = self._genai_cost(entry, usage)
            if theirs != cost:
                if entry.exact:
                    log.warning("llmtap recorder: pricing %s/%s here gives %s, genai-prices %s: it is priced by "
                                "genai-prices from now on", entry.provider, entry.model, cost, theirs)
                entry.exact = False
                cost = theirs
                if theirs is None:
                    return _unknown(f"{self._source} cannot price model {model} from the tokens recorded")
            entry.checked = True
        return Priced(cost, self._source, text=entry.texts.get(used) or self._detail_text(entry, used, model, when))

    def _detail_text(self, entry: _Entry, used: tuple[str, ...], model: str, when: datetime) -> str:
        # The entry is one (provider, model, date): only the tier changes what it says.
        text = json.dumps({"provider": entry.provider, "model": entry.model, "model_ref": model,
                           "prices": self._source, "date": _utc(when).date().isoformat(),
                           "per_million": dict(zip(entry.kinds, used))}, sort_keys=True)
        if entry.exact:
            entry.texts[used] = text
        return text

    def _genai_cost(self, entry: _Entry, usage: Usage) -> Decimal | None:
        from genai_prices import Usage as GenaiUsage

        plain, out, read, write = _tokens(usage)
        try:
            return entry.model_price.calc_price(GenaiUsage(
                input_tokens=plain + read + write, output_tokens=out, cache_read_tokens=read,
                cache_write_tokens=write, cache_write_1h_tokens=_hour_writes(usage, write)))["total_price"]
        except Exception:
            return None


def usd(value: Decimal | None) -> str:
    """A cost for people: '-' when unknown, cents from a dollar up, else up to six decimals."""
    if value is None:
        return "-"
    if value == 0:
        return "$0"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    text = f"{value:.6f}".rstrip("0")
    return f"${text}" if text not in ("0.", "-0.") else "<$0.000001"


def usage_of(ex: Any) -> Usage | None:
    """The normalised usage of an extraction: its own `usage` where the extraction has one,
    else one made from its token counts (an extraction that predates `usage`)."""
    usage = getattr(ex, "usage", None)
    if isinstance(usage, Usage) and (usage.input_tokens is not None or usage.output_tokens is not None
                                     or usage.cost_usd is not None):
        return usage
    if ex.input_tokens is None and ex.output_tokens is None:
        return None
    return Usage(input_tokens=ex.input_tokens, output_tokens=ex.output_tokens, reasoning_tokens=ex.reasoning_tokens,
                 total_tokens=ex.total_tokens)


def _unknown(reason: str) -> Priced:
    return Priced(None, UNKNOWN, {"reason": reason})


def _time_of_day(model: Any) -> bool:
    prices = model.prices if isinstance(model.prices, list) else []
    return any(type(p.constraint).__name__ == "TimeOfDateConstraint" for p in prices)


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


# -- a price table saved by `llmtap prices update` ------------------------------------------------
def load_prices_file(path: Path) -> tuple[Any, str | None]:
    """(genai-prices snapshot, when it was fetched) from a file `llmtap prices update` wrote."""
    from genai_prices import data_snapshot
    from genai_prices.types import _providers_from_raw

    saved = json.loads(path.read_text(encoding="utf-8"))
    providers = _providers_from_raw(saved["providers"])
    return data_snapshot.DataSnapshot(providers, from_auto_update=False), saved.get("fetched_at")
