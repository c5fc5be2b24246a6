"""`llmtap run --metrics HOST:PORT`: Prometheus metrics of the recorded calls, at GET /metrics.

Served from the recorder's process, so the proxy's process does no metrics work at all. The
writer hands each committed batch to `Metrics.committed`, which keeps a few small fields per
call (never the bodies) in a bounded deque and returns; a thread of its own turns them into
counters and histograms every DRAIN_S, and a scrape drains first, so that what it reads is as
current as the file. Queue depth, drops, the spool and the calls in flight are read from the
recorder at scrape time, not counted per row.

All of it lives in one process and one `CollectorRegistry` of its own (prometheus-client's
multiprocess mode would bring its limits, for nothing: the recorder is one process). When the
recorder's process dies and the proxy starts a new one, the counters start again at 0, which
Prometheus' `rate()` and `increase()` read as a counter reset.

No label is unbounded: never a user agent, a session or a key; model names, providers and
routes each count as `other` past their cap (the first names seen keep their own series).
"""

from __future__ import annotations

import ipaddress
import logging
import socketserver
import sys
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from llmtap.recorder.columns import ATTEMPT_COLUMNS, CALL_COLUMNS

log = logging.getLogger("llmtap.recorder")

# Up to long reasoning calls, which can think for many minutes before and while they answer.
BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
             3600.0)
MODEL_CAP = 100  # distinct model names with a series of their own
NAME_CAP = 100  # likewise for providers and routes (bounded by rules.yaml, capped all the same)
LABEL_CHARS = 128  # a longer model name (a hostile client's) is cut to this
LABEL_MEMO = 10_000  # raw label combinations remembered (forgotten all at once past it)
QUEUE_CALLS = 100_000  # calls waiting to be counted; past it they are dropped, and counted
DRAIN_S = 1.0
OTHER = "other"
_TOKEN_KINDS = (("input_tokens", "input"), ("output_tokens", "output"), ("reasoning_tokens", "reasoning"),
                ("cache_read_tokens", "cache_read"), ("cache_write_tokens", "cache_write"))
_APIS = frozenset({"openai.chat", "openai.responses", "anthropic.messages", "ollama.chat", "gemini.generate", "other"})


class Capped:
    """Label values, at most `cap` distinct ones: the first seen keep theirs, later ones are
    `other`. Missing is ''. Used by one thread (the drain holds its lock)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._seen: dict[str, str] = {}

    def __call__(self, value: Any) -> str:
        if value is None or value == "":
            return ""
        text = value if isinstance(value, str) else str(value)
        label = self._seen.get(text)
        if label is not None:
            return label
        if len(self._seen) >= self.cap:
            return OTHER
        label = text[:LABEL_CHARS]
        self._seen[text] = label
        return label


def status_class(status: Any) -> str:
    if not isinstance(status, int) or not 100 <= status < 600:
        return "none"  # no response: the client went away first, or no upstream answered
    return f"{status // 100}xx"


def attempt_outcome(status: Any, error: Any) -> str:
    """One attempt's outcome: its status class, `cut` for an answer that broke off after its
    head, or the kind of failure before any response (`connect`, `timeout`, `skipped`)."""
    text = error if isinstance(error, str) else ""
    if isinstance(status, int):
        if status < 400 and text.startswith(("upstream cut", "upstream closed", "upstream broke")):
            return "cut"
        return status_class(status)
    kind = text.split(":", 1)[0]
    return kind if kind in ("connect", "timeout", "skipped") else "error"


def _stream(value: Any) -> str:
    return "true" if value is True else "false" if value is False else ""


def _amount(value: Any) -> float:
    """A token count or a cost as a counter takes it: numbers above 0, anything else 0."""
    if isinstance(value, bool):
        return 0.0
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if number > 0 and number != float("inf") else 0.0


# What committed() keeps of a call row and of an attempt row: no body, no header, no client.
# `cost_usd` and the cache columns are read where the table has them.
_CALL_FIELDS = ("provider", "model_sent", "model_requested", "route", "api", "status", "stream", "attempts",
                "complete", "duration_ms", "ttfb_ms", "cost_usd") + tuple(c for c, _ in _TOKEN_KINDS)
_ATTEMPT_FIELDS = ("provider", "status", "error")
_CALL_LABELS = ("provider", "model", "route", "api", "status_class", "stream")
_TIMING_LABELS = ("provider", "model", "stream")
_PM = ("provider", "model")
# name -> (help, label names); the counters, kept as plain dicts from label values to counts
# (prometheus-client's own Counter costs about ten times as much per increment), and exposed
# at scrape time through the library's metric families.
_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llmtap_requests": ("Finished calls, as committed to the DB", _CALL_LABELS),
    "llmtap_attempts": ("Upstream attempts by outcome: 2xx..5xx, cut, connect, timeout, skipped, error",
                        ("provider", "outcome")),
    "llmtap_fallbacks": ("Calls answered after more than one upstream attempt (provider: the one that answered)",
                         ("provider", "model", "route")),
    "llmtap_tokens": ("Tokens by kind: input, output, reasoning, cache_read, cache_write", ("provider", "model", "kind")),
    "llmtap_cost_usd": ("Cost of the calls priced (calls.cost_usd)", _PM),
    "llmtap_cut_streams": ("Answers that began (status under 400) and ended short", _PM),
}
_HISTOGRAMS: dict[str, str] = {
    "llmtap_request_duration_seconds": "Call duration, request to last byte",
    "llmtap_ttfb_seconds": "Time to the first response byte forwarded to the client",
}
_LE = tuple(f"{b:g}" if b != int(b) else f"{b:.1f}" for b in BUCKETS_S) + ("+Inf",)


def _getter(fields: tuple[str, ...], columns: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple]:
    """A row's `fields` in one C call; None for those the table does not have."""
    present = [f for f in fields if f in columns]
    get = itemgetter(*present)
    if len(present) == len(fields):
        return get
    where = [present.index(f) if f in present else -1 for f in fields]

    def pick(row: dict[str, Any]) -> tuple:
        got = get(row)
        return tuple(got[i] if i >= 0 else None for i in where)

    return pick


class Metrics:
    """The `--metrics` service (see services.Service): counts committed rows, serves /metrics."""

    def __init__(self, recorder: Any, *, model_cap: int = MODEL_CAP, name_cap: int = NAME_CAP,
                 queue_calls: int = QUEUE_CALLS) -> None:
        self.recorder = recorder
        self.queue_calls = queue_calls
        self.registry = CollectorRegistry()
        self.model = Capped(model_cap)
        self.provider = Capped(name_cap)
        self.route = Capped(name_cap)
        self.server: ThreadingWSGIServer | None = None
        self._call = _getter(_CALL_FIELDS, CALL_COLUMNS)
        self._attempt = _getter(_ATTEMPT_FIELDS, ATTEMPT_COLUMNS)
        self._pending: deque[tuple[list[tuple], list[tuple]]] = deque()
        self._queued = 0  # calls appended to _pending, by the writer only
        self._taken = 0  # calls taken from _pending, by the drain only
        self.dropped = 0  # calls not counted because the queue was full (written by the writer only)
        self._lock = threading.Lock()  # guards the counts: one drain or one scrape at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # A row's raw values -> its label tuples: most calls repeat a few combinations.
        self._labels: dict[tuple, tuple[tuple[str, ...], ...]] = {}
        self.counts: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in _COUNTERS}
        # label values -> [count per bucket (not cumulative), ..., count over the last, sum]
        self.histograms: dict[str, dict[tuple[str, ...], list[float]]] = {name: {} for name in _HISTOGRAMS}
        self.registry.register(_Collector(self))

    # -- the Service ---------------------------------------------------------------------------
    def committed(self, calls: list[dict[str, Any]], attempts: list[dict[str, Any]]) -> None:
        """On the writer thread: keep the few fields counted, hand them on, return."""
        if self._queued - self._taken + len(calls) > self.queue_calls:
            self.dropped += len(calls)
            return
        self._pending.append((list(map(self._call, calls)), list(map(self._attempt, attempts))))
        self._queued += len(calls)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # -- counting --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmtap-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(DRAIN_S):
            try:
                self.drain()
            except Exception:  # a bug of ours must not stop the counting for the rest of the run
                log.exception("llmtap recorder: counting metrics failed")

    def drain(self) -> None:
        """Count what the writer handed on since the last drain."""
        with self._lock:
            while self._pending:
                calls, attempts = self._pending.popleft()
                self._count(calls, attempts)
                self._taken += len(calls)

    def _count(self, calls: list[tuple], attempts: list[tuple]) -> None:
        c = self.counts
        requests, fallbacks, tokens, costs, cuts = (c["llmtap_requests"], c["llmtap_fallbacks"], c["llmtap_tokens"],
                                                    c["llmtap_cost_usd"], c["llmtap_cut_streams"])
        durations, ttfbs = self.histograms["llmtap_request_duration_seconds"], self.histograms["llmtap_ttfb_seconds"]
        labels = self._labels
        if len(labels) > LABEL_MEMO:
            labels.clear()
        for (provider, model_sent, model_requested, route, api, status, stream, n_attempts, complete,
             duration_ms, ttfb_ms, cost, *token_counts) in calls:
            raw = (provider, model_sent or model_requested, route, api, status, stream)
            memo = labels.get(raw)
            if memo is None:
                p, m, r, s = self.provider(provider), self.model(raw[1]), self.route(route), _stream(stream)
                memo = labels[raw] = ((p, m, r, api if api in _APIS else OTHER, status_class(status), s),
                                      (p, m, r), (p, m), (p, m, s))
            key, pmr, pm, timing = memo
            requests[key] = requests.get(key, 0) + 1
            if isinstance(n_attempts, int) and n_attempts > 1:
                fallbacks[pmr] = fallbacks.get(pmr, 0) + 1
            p, m = pm
            _observe(durations, timing, duration_ms)
            _observe(ttfbs, timing, ttfb_ms)
            for (_, kind), value in zip(_TOKEN_KINDS, token_counts):
                if value and (amount := _amount(value)):
                    key = (p, m, kind)
                    tokens[key] = tokens.get(key, 0) + amount
            if cost is not None and (amount := _amount(cost)):
                costs[pm] = costs.get(pm, 0) + amount
            if complete is False and isinstance(status, int) and status < 400:
                cuts[pm] = cuts.get(pm, 0) + 1
        outcomes = c["llmtap_attempts"]
        for provider, status, error in attempts:
            key = (self.provider(provider), attempt_outcome(status, error))
            outcomes[key] = outcomes.get(key, 0) + 1

    def families(self) -> Iterator[Metric]:
        """The counts as the library's metric families, for a scrape."""
        with self._lock:
            counts = {name: list(values.items()) for name, values in self.counts.items()}
            histograms = {name: [(k, list(v)) for k, v in values.items()] for name, values in self.histograms.items()}
        for name, (doc, labels) in _COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, value in counts[name]:
                family.add_metric(key, value)
            yield family
        for name, doc in _HISTOGRAMS.items():
            hist = HistogramMetricFamily(name, doc, labels=_TIMING_LABELS)
            for key, cells in histograms[name]:
                cumulative, running = [], 0.0
                for le, n in zip(_LE, cells):
                    running += n
                    cumulative.append((le, running))
                hist.add_metric(key, cumulative, cells[-1])
            yield hist

    # -- serving -------------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (raises OSError when it cannot); returns the address bound."""
        app = _guarded(make_wsgi_app(self.registry), self.drain, _is_loopback(host))

        class Server(ThreadingWSGIServer):
            address_family = _family(host)

            def server_bind(self) -> None:
                # HTTPServer's would look the host up in reverse DNS (socket.getfqdn): seconds
                # of start-up on a machine whose resolver is out of reach.
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = host, self.server_address[1]
                self.setup_environ()

        self.server = make_server(host, port, app, Server, handler_class=_QuietHandler)
        threading.Thread(target=self.server.serve_forever, name="llmtap-metrics-http", daemon=True).start()
        bound = self.server.server_address
        return str(bound[0]), int(bound[1])


def _observe(histogram: dict[tuple[str, ...], list[float]], key: tuple[str, ...], ms: Any) -> None:
    if not isinstance(ms, (int, float)) or ms < 0:
        return
    cells = histogram.get(key)
    if cells is None:
        cells = histogram[key] = [0.0] * (len(BUCKETS_S) + 2)
    seconds = ms / 1000
    cells[bisect_left(BUCKETS_S, seconds)] += 1  # le: a value on a bound counts in that bound's bucket
    cells[-1] += seconds


class _Collector(Collector):
    """The counts, and what the recorder holds right now, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        from llmtap.recorder.recorder import spool_path

        yield from self.metrics.families()
        rec = self.metrics.recorder
        rec = self.metrics.recorder
        # len() of a dict or deque another thread changes is safe: one atomic step under the GIL.
        yield GaugeMetricFamily("llmtap_calls_in_flight", "Calls started and not yet finished, as the recorder "
                                "saw at its last batch (calls shorter than a batch are never seen in flight)",
                                value=len(rec._calls))
        yield GaugeMetricFamily("llmtap_recorder_queue_depth", "Records handed to the recorder, not yet written",
                                value=len(rec._queue))
        dropped = CounterMetricFamily("llmtap_recorder_dropped_calls", "Finished calls not recorded, by why "
                                      "(queue: the writer fell behind; store: neither the DB nor its spool could "
                                      "be written; metrics: recorded, not counted here)", labels=["reason"])
        dropped.add_metric(["queue"], rec.dropped_total)
        dropped.add_metric(["store"], rec._lost)
        dropped.add_metric(["metrics"], self.metrics.dropped)
        yield dropped
        yield CounterMetricFamily("llmtap_recorder_committed_calls", "Finished calls committed, waiting in memory "
                                  "or spooled", value=rec.written)
        yield GaugeMetricFamily("llmtap_recorder_buffer_bytes", "Records kept in memory while the DB cannot be "
                                "written (--buffer-mb)", value=rec._waiting_bytes)
        try:
            spooled = spool_path(rec.db_path).stat().st_size
        except OSError:
            spooled = 0
        yield GaugeMetricFamily("llmtap_recorder_spool_bytes", "Size of the spool beside the DB: records waiting "
                                "to be imported once it can be written", value=spooled)
        yield GaugeMetricFamily("llmtap_recorder_db_failing", "1 while the DB cannot be opened or written",
                                value=1 if rec._failing else 0)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


def _guarded(app: Callable, before: Callable[[], None], loopback: bool) -> Callable:
    """The library's app, at /metrics only, counting what is pending first; bound to loopback,
    only for a loopback Host name, so that a web page cannot read it by DNS rebinding."""

    def guarded(environ: dict[str, Any], start_response: Callable) -> Iterator[bytes] | list[bytes]:
        if loopback and not _loopback_host(environ.get("HTTP_HOST", "")):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"llmtap metrics: a loopback listener answers only a loopback Host name\n"]
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"llmtap metrics are at /metrics\n"]
        try:
            before()
        except Exception:
            log.exception("llmtap recorder: counting metrics failed")
        return app(environ, start_response)

    return guarded


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loopback_host(header: str) -> bool:
    if not header:
        return True  # HTTP/1.0 without Host: nothing to rebind
    host = header[1:].split("]", 1)[0] if header.startswith("[") else header.rsplit(":", 1)[0]
    return _is_loopback(host.lower())


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET


def split_hostport(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT', as `llmtap run` checked and wrote it."""
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def start(address: str, recorder: Any, **kwargs: Any) -> Metrics | None:
    """The service, counting and serving at `address`; None (said loudly) when it cannot listen:
    recording goes on without metrics."""
    host, port = split_hostport(address)
    metrics = Metrics(recorder, **kwargs)
    try:
        bound = metrics.serve(host, port)
    except OSError as exc:
        log.error("llmtap recorder: --metrics %s: cannot listen there (%s). Metrics are off for this run; "
                  "recording goes on. Stop what holds that port, or give another, e.g. --metrics %s:%d",
                  address, exc.strerror or exc, host if ":" not in host else f"[{host}]", port + 1 if port else 9464)
        return None
    metrics.start()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(f"llmtap metrics   http://{shown}:{bound[1]}/metrics   (Prometheus, served by the recorder process)",
          file=sys.stderr, flush=True)
    return metrics
