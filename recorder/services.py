"""What runs beside the writer in the recorder's process, fed from committed rows: metrics,
traces, the archive schedule (`llmtap run --metrics/--otlp/--archive-every`).

They hear of rows only after the transaction that wrote them commits, so what they publish is
what the file holds, and they run off the proxy's process altogether. A service's
`committed()` is called on the writer thread: it must only hand the rows on (a bounded queue
of its own, counted drops) and never block, raise into, or slow the writer.

The options cross to the recorder process as one JSON object (`Options.to_json`), so adding a
service adds a field here and nothing to the process's argument list.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

log = logging.getLogger("llmtap.recorder")


@dataclass
class Options:
    """Settings of the services, from `llmtap run`'s flags. An empty field: that service is off."""

    metrics: str | None = None  # HOST:PORT to serve /metrics on
    otlp: dict[str, Any] = field(default_factory=dict)
    archive: dict[str, Any] = field(default_factory=dict)
    # Not a service: the rules file whose prices the recorder reads (pricerules.py), known to
    # `llmtap run`; None when it runs without one.
    rules: str | None = None
    # Session grouping (recorder/sessions.py): {"idle_s": seconds} (`llmtap run --session-idle`),
    # {"off": true} to record without it. Not a service: the writer runs it as rows are made.
    sessions: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Options:
        data = json.loads(text) if text else {}
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def any(self) -> bool:
        return bool(self.metrics or self.otlp or self.archive)


class Service(Protocol):
    def committed(self, calls: list[dict[str, Any]], attempts: list[dict[str, Any]]) -> None:
        """Finished calls (and their attempts) just committed, as rows by column name."""

    def close(self) -> None:
        """The recorder is closing: finish or drop what is queued, within a few seconds."""


def start(options: Options, recorder: Any) -> list[Service]:
    """The services `options` turns on, started. One that cannot start is said and left out:
    recording goes on without it."""
    services: list[Service] = []
    if options.metrics:
        from llmtap.recorder import metrics

        served = metrics.start(options.metrics, recorder)
        if served is not None:
            services.append(served)
    if options.archive:
        from llmtap.recorder.archive import ArchiveService

        try:
            services.append(ArchiveService(options.archive, recorder))
        except Exception as exc:
            log.error("llmtap recorder: --archive-to: %s; recording goes on without the archive", exc)
    if options.otlp.get("endpoint"):
        try:
            from llmtap.recorder.otlp import OtlpService, shown

            services.append(OtlpService(options.otlp))
            log.info("llmtap recorder: traces go to %s", shown(options.otlp["endpoint"]))
        except Exception as exc:
            log.error("llmtap recorder: traces cannot be sent (%s); recording goes on without them", exc)
    return services
