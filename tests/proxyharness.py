"""Runs a real llmtap proxy (mitmproxy + relay) on its own thread and loop for tests."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from llmtap.addons.runner import Proxy, RunConfig
from llmtap.recorder.events import Attempt, CallFinished
from llmtap.recorder.record import MemorySink, Sink


class RunningProxy:
    """`with RunningProxy(rules_path, confdir) as p:` -- both listeners on ports from the OS."""

    def __init__(self, rules_path: Path | None, confdir: Path, sink: Sink | None = None,
                 reload_interval_s: float = 0.05) -> None:
        self.sink = sink if sink is not None else MemorySink()
        self.config = RunConfig(proxy=("127.0.0.1", 0), gateway=("127.0.0.1", 0), rules_path=rules_path,
                                confdir=confdir, reload_interval_s=reload_interval_s)
        self.lines: list[tuple[CallFinished, list[Attempt]]] = []
        self.proxy: Proxy | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def memory(self) -> MemorySink:
        assert isinstance(self.sink, MemorySink)
        return self.sink

    @property
    def gateway_url(self) -> str:
        assert self.proxy is not None and self.proxy.gateway_addr is not None
        return f"http://127.0.0.1:{self.proxy.gateway_addr[1]}"

    @property
    def proxy_url(self) -> str:
        assert self.proxy is not None and self.proxy.proxy_addr is not None
        return f"http://127.0.0.1:{self.proxy.proxy_addr[1]}"

    @property
    def ca(self) -> Path:
        return self.config.confdir / "mitmproxy-ca-cert.pem"

    def __enter__(self) -> RunningProxy:
        self._thread = threading.Thread(target=self._run, name="llmtap-test-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("llmtap proxy did not start within 60 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self.proxy is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.proxy.stop)
            self._thread.join(30)

    def call_in_loop(self, fn, *args):
        """Run fn(*args) on the proxy's loop and return its result (for poking at state)."""
        assert self._loop is not None
        done = threading.Event()
        box: list = []

        def run() -> None:
            box.append(fn(*args))
            done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)
        return box[0]

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced to the test thread
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _main(self) -> None:
        self.proxy = Proxy(self.config, self.sink, on_finished=lambda c: self.lines.append((c, list(c.tries))))
        await self.proxy.start()
        self._ready.set()
        try:
            await self.proxy.wait()
        finally:
            await self.proxy.close()
