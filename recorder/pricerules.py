"""Prices stated in rules.yaml: a provider's `price`, read by the recorder and checked by
`llmtap rules check`.

The recorder's process may not import the proxy (llmtap.addons), which owns rules.yaml, so it
reads the one key it needs itself: this module. `llmtap rules check` validates the same key with
the same function (`parse_price`), so the two cannot disagree about what a price means. It
imports neither DuckDB nor genai-prices: the proxy's process loads it to check the file.

    providers:
      ollama: {base_url: http://127.0.0.1:11434, api: ollama, price: free}
      homelab:
        base_url: http://192.168.1.20:8000/v1
        api: openai
        price:                     # USD per million tokens; model globs, first match wins
          "qwen3*": {input: 0.10, output: 0.40, cache_read: 0.01}
          "*": free

A model's `input` price is for input tokens that are neither cache reads nor cache writes;
`cache_read` and `cache_write` default to the `input` price when left out.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

log = logging.getLogger("llmtap.recorder")

PRICE_KEYS = ("input", "output", "cache_read", "cache_write")
FREE = "free"
_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens; `glob` is the model pattern it was written for."""

    glob: str
    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal

    @property
    def free(self) -> bool:
        return not (self.input or self.output or self.cache_read or self.cache_write)


@dataclass(frozen=True, slots=True)
class ProviderPrices:
    """A provider's prices from rules.yaml: model globs in the order written."""

    provider: str
    models: tuple[ModelPrice, ...]

    def find(self, *names: str | None) -> ModelPrice | None:
        """The first entry whose glob matches any of the model's names (case ignored)."""
        lowered = [n.lower() for n in names if n]
        for entry in self.models:
            glob = entry.glob.lower()
            if any(fnmatch.fnmatchcase(n, glob) for n in lowered):
                return entry
        return None


def _free(glob: str) -> ModelPrice:
    return ModelPrice(glob, _ZERO, _ZERO, _ZERO, _ZERO)


def _decimal(value: Any) -> Decimal | None:
    """A price as written: YAML gives 0.1 as a float, whose shortest repr is what was typed."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        return None
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return d if d.is_finite() and d >= 0 else None


def parse_price(provider: str, value: Any) -> tuple[ProviderPrices | None, list[tuple[str | None, str]]]:
    """A provider's `price` value -> its prices, and the problems found, each as (the model glob
    it concerns or None, what is wrong and what to write instead)."""
    problems: list[tuple[str | None, str]] = []
    what = f"provider `{provider}`: price"
    example = ('write `price: free`, or model globs with USD per million tokens, e.g. '
               'price: {"gpt-4o*": {input: 2.50, output: 10.00, cache_read: 1.25}}')
    if isinstance(value, str) and value.strip().lower() == FREE:
        return ProviderPrices(provider, (_free("*"),)), problems
    if not isinstance(value, dict) or not value:
        problems.append((None, f"{what} must be `free` or a mapping of model globs to prices; {example}"))
        return None, problems
    models: list[ModelPrice] = []
    for glob, entry in value.items():
        if not isinstance(glob, str) or not glob:
            problems.append((None, f"{what}: a model glob must be text such as \"gpt-4o*\", not {glob!r}"))
            continue
        at = f"{what} of `{glob}`"
        if isinstance(entry, str) and entry.strip().lower() == FREE:
            models.append(_free(glob))
            continue
        if not isinstance(entry, dict):
            problems.append((glob, f"{at} must be `free` or {{input: N, output: N}} (USD per million tokens)"))
            continue
        unknown = [str(k) for k in entry if k not in PRICE_KEYS]
        if unknown:
            problems.append((glob, f"{at}: unknown key `{unknown[0]}`; the keys are {', '.join(PRICE_KEYS)} "
                                   "(USD per million tokens)"))
        prices: dict[str, Decimal] = {}
        for key in PRICE_KEYS:
            if key not in entry:
                continue
            d = _decimal(entry[key])
            if d is None:
                problems.append((glob, f"{at}: {key} must be a number of USD per million tokens, 0 or more "
                                       f"(e.g. {key}: 2.50), not {entry[key]!r}"))
            else:
                prices[key] = d
        missing = [k for k in ("input", "output") if k not in entry]
        if missing:
            problems.append((glob, f"{at}: {' and '.join(missing)} missing; write both input and output "
                                   "(USD per million tokens), e.g. {input: 2.50, output: 10.00}"))
            continue
        if len(prices) < len([k for k in PRICE_KEYS if k in entry]):
            continue
        models.append(ModelPrice(glob, prices["input"], prices["output"],
                                 prices.get("cache_read", prices["input"]), prices.get("cache_write", prices["input"])))
    if problems:
        return None, problems
    return ProviderPrices(provider, tuple(models)), problems


@dataclass(frozen=True, slots=True)
class RulesPrices:
    """What pricing needs from a rules file: each provider's prices, and the base URLs the file
    gives providers (a provider named like a built-in one may point elsewhere, e.g. a local
    server: it is then priced by its URL, not its name)."""

    source: str | None = None
    prices: dict[str, ProviderPrices] | None = None
    base_urls: dict[str, str] | None = None


def read_rules_prices(path: Path) -> RulesPrices:
    """The prices of a rules file; raises ValueError naming the file when they cannot be read."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read it ({' '.join(str(exc).split())})") from None
    if data is None:  # an editor's save passes through an empty file: not "no prices"
        raise ValueError(f"{path}: the file is empty")
    providers = data.get("providers") if isinstance(data, dict) else None
    prices: dict[str, ProviderPrices] = {}
    urls: dict[str, str] = {}
    problems: list[str] = []
    for name, spec in (providers or {}).items() if isinstance(providers, dict) else ():
        if not isinstance(spec, dict):
            continue
        if isinstance(spec.get("base_url"), str):
            urls[str(name)] = spec["base_url"].rstrip("/")
        if "price" in spec:
            parsed, found = parse_price(str(name), spec["price"])
            problems += [p for _, p in found]
            if parsed is not None:
                prices[str(name)] = parsed
    if problems:
        raise ValueError(f"{path}: {problems[0]} (llmtap rules check {path} lists every problem)")
    return RulesPrices(str(path), prices, urls)


class RulesWatch:
    """A rules file's prices, read again when the file changes (checked at most once a second,
    by its size and mtime: a stat). A bad edit keeps the last good prices and is said once, as
    the proxy does with its routes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.current = RulesPrices()
        self._stat: tuple[int, int] | None = None
        self._checked = -1.0
        self._said: str | None = None
        self.refresh(force=True)

    def refresh(self, now: float | None = None, force: bool = False) -> RulesPrices:
        if self.path is None:
            return self.current
        now = time.monotonic() if now is None else now
        if not force and now - self._checked < 1.0:
            return self.current
        self._checked = now
        try:
            st = os.stat(self.path)
            stat: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
        except OSError:
            stat = None
        if stat == self._stat:
            return self.current
        self._stat = stat
        try:
            self.current = read_rules_prices(self.path)
            self._said = None
        except ValueError as exc:
            if str(exc) != self._said:
                self._said = str(exc)
                log.error("llmtap recorder: the prices in %s are not used (%s); calls keep the last good "
                          "prices", self.path, exc)
        return self.current
