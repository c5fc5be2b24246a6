"""The composition root: the one place that wires the proxy (llmtap.addons) to the UI
(llmtap.tui). Neither imports the other (the import contracts in pyproject.toml), so
`llmtap run --tui` is put together here and handed to the proxy's `run` command."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmtap.addons.runner import RunConfig
    from llmtap.recorder.recorder import Recorder


def run_tui_with_proxy(config: RunConfig, sink: Any, recorder: Recorder | None) -> int:
    """`llmtap run --tui`: the proxy runs on the UI's event loop; quitting stops it cleanly.

    Returns the exit code: 2 with the message on stderr when the proxy cannot start."""
    from llmtap.addons.runner import Proxy
    from llmtap.tui.app import Listening, LlmtapApp
    from llmtap.tui.commands import UILogHandler

    reader = None
    note = None
    if recorder is not None:
        from llmtap.recorder.reader import InProcessReader

        reader = InProcessReader(recorder)
        source = str(getattr(recorder, "path", getattr(recorder, "db", "")) or "")
    else:
        source = "not recording"
        note = "not recording (--no-record): calls are proxied but not kept"
    app = LlmtapApp(reader, source=source, proxy_factory=lambda: Proxy(config, sink), note=note,
                    listening=Listening(config.proxy, config.gateway, config.confdir))

    root = logging.getLogger()
    saved = list(root.handlers)
    for h in saved:
        root.removeHandler(h)
    handler = UILogHandler(app)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    try:
        code = app.run()
    finally:
        root.removeHandler(handler)
        for h in saved:
            root.addHandler(h)
        if reader is not None:
            reader.close()
    if app.startup_error:
        print(f"llmtap: {app.startup_error}", file=sys.stderr)
        return 2
    return int(code or 0)
