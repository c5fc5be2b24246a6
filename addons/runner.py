"""Start mitmproxy, the relay and the recorder in one process, on one asyncio loop.

`DumpMaster` would exit the process when anything logs an error at start-up (a busy port),
so a bare `Master` with the part of mitmproxy's default addons llmtap needs is used, and
start-up failures are turned into one clear message here.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path


def _defer_mitmproxy_addons_init() -> None:
    """Import `mitmproxy.addons` without running its __init__, which imports all 31 default
    addons (Flask for mitm.it, ldap3 for proxy auth, the flow filter language ...) only to list
    them in default_addons(): about 40% of `llmtap run`'s start-up, for addons llmtap never
    loads (see _mitm_addons). Submodules import as usual; the first lookup of anything else on
    the package (default_addons, for a DumpMaster in the same process) runs the real __init__
    then, so nothing behaves differently."""
    if "mitmproxy.addons" in sys.modules:
        return
    import importlib
    import importlib.util

    import mitmproxy

    spec = importlib.util.find_spec("mitmproxy.addons")
    if spec is None or spec.loader is None:
        return
    pkg = importlib.util.module_from_spec(spec)

    def __getattr__(name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        if importlib.util.find_spec(f"mitmproxy.addons.{name}") is not None:
            # A submodule (`from mitmproxy.addons import core` asks this first): just that one.
            return importlib.import_module(f"mitmproxy.addons.{name}")
        del pkg.__dict__["__getattr__"]
        spec.loader.exec_module(pkg)  # type: ignore[union-attr]
        return getattr(pkg, name)

    pkg.__dict__["__getattr__"] = __getattr__
    sys.modules["mitmproxy.addons"] = pkg
    mitmproxy.addons = pkg  # type: ignore[attr-defined]


_defer_mitmproxy_addons_init()

from mitmproxy import master as mitm_master  # noqa: E402
from mitmproxy import options as mitm_options  # noqa: E402
from mitmproxy.addons.proxyserver import Proxyserver  # noqa: E402
from mitmproxy.proxy.mode_servers import ServerInstance  # noqa: E402

from llmtap.addons import http1guard  # noqa: E402
from llmtap.addons import rules as rules_mod  # noqa: E402
from llmtap.addons.hostport import StartupError, parse_hostport  # noqa: E402,F401 (re-exported)
from llmtap.addons.relay import Cooldown, Relay  # noqa: E402
from llmtap.addons.routing import Router, Security  # noqa: E402
from llmtap.recorder.events import CallFinished  # noqa: E402
from llmtap.recorder.record import DEFAULT_BODY_LIMIT, Sink  # noqa: E402

log = logging.getLogger("llmtap")


@dataclass
class RunConfig:
    proxy: tuple[str, int] | None = ("127.0.0.1", 8080)
    gateway: tuple[str, int] | None = ("127.0.0.1", 8081)
    rules_path: Path | None = None  # None: built-in providers only, no routes
    confdir: Path = field(default_factory=lambda: Path.home() / ".mitmproxy")
    reload_interval_s: float = 1.0
    body_limit: int = DEFAULT_BODY_LIMIT  # of each body, the most the record keeps (--max-body)
    # A client sending this as its API key gets the providers' key_env keys (None: none can).
    gateway_token: str | None = None
    # Browser Origins that may use the gateway, e.g. "http://localhost:3000"; any other is refused.
    allow_origins: tuple[str, ...] = ()

    def security(self) -> Security:
        hosts = {self.gateway[0].lower().strip("[]")} if self.gateway is not None else set()
        return Security(token=self.gateway_token or None,
                        allow_origins=frozenset(o.strip().rstrip("/").lower() for o in self.allow_origins),
                        gateway_hosts=frozenset(hosts))


_NOT_SEEN = object()  # RulesHolder._pending before any change was seen (None is "no file")


class RulesHolder:
    """The rules in force. Watches the file and reloads it; a bad edit keeps the last good
    rules and says why, once per change.

    Editors save by truncating and rewriting, so a look at the file can catch it empty or cut
    short, and a prefix of a good file may well parse. So a change is applied only once the
    file has held still for a whole interval (same size, mtime and inode at two looks), and
    only if it did not change while it was read. An empty file is never taken for "no rules".
    """

    def __init__(self, path: Path | None, on_change: Callable[[rules_mod.Rules], None] | None = None) -> None:
        self.path = path
        self.on_change = on_change
        # Stat before reading: a write that lands while the file is read is then a change.
        self._stamp = self._stat()
        self._pending: tuple[int, int, int] | None | object = _NOT_SEEN
        self.current = rules_mod.load_rules(path) if path is not None else rules_mod.default_rules()

    def __call__(self) -> rules_mod.Rules:
        return self.current

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def settled(self) -> bool:
        """Whether the file as it is now has been dealt with (applied, or refused and said why)."""
        return self._stamp == self._stat()

    def check(self) -> bool:
        """Reload if the file changed and held still since; returns True when new rules took effect."""
        if self.path is None:
            return False
        stamp = self._stat()
        if stamp == self._stamp:
            self._pending = _NOT_SEEN
            return False
        if stamp != self._pending:
            self._pending = stamp  # changed since the last look: perhaps still being written
            return False
        self._pending = _NOT_SEEN
        if stamp is None:
            self._stamp = stamp
            log.warning("%s disappeared; keeping the rules loaded before", self.path)
            return False
        try:
            text = rules_mod.read_rules_text(self.path)
        except rules_mod.RulesError as exc:
            if self._stat() == stamp:
                self._stamp = stamp
                log.error("%s cannot be read; keeping the last good rules:\n%s", self.path, exc)
            return False
        if self._stat() != stamp:
            return False  # written while we read it: wait for it to hold still again
        self._stamp = stamp
        try:
            new = rules_mod.parse_rules(text, str(self.path))
        except rules_mod.EmptyRulesError:
            log.error("%s has no rules in it (empty, or only comments; an editor may be saving it). "
                      "Keeping the last good rules (%d routes); write `routes: []` to run with no "
                      "routes on purpose.", self.path, len(self.current.routes))
            return False
        except rules_mod.RulesError as exc:
            log.error("%s has errors; keeping the last good rules:\n%s", self.path, exc)
            return False
        self.current = new
        log.warning("reloaded %s: %d providers, %d routes", self.path, len(new.providers), len(new.routes))
        if self.on_change is not None:
            self.on_change(new)
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.check()
            except Exception:  # never let the watcher die silently
                log.exception("rules reload failed")


def allow_hosts(rules: rules_mod.Rules, relay_port: int) -> list[str]:
    """Regexes for mitmproxy's allow_hosts: LLM API hosts and the relay; all else is a raw tunnel."""
    pats = [rf"^{re.escape(host)}:{port}$" for host, port in sorted(rules.intercept_addresses())]
    # The gateway's reverse target is the relay; without this its traffic would be tunnelled.
    pats.append(rf"^127\.0\.0\.1:{relay_port}$")
    return pats


def _mitm_addons() -> list[object]:
    """The part of mitmproxy's default addons a proxy for LLM APIs needs.

    mitmproxy calls every addon in its chain for every event of every flow, so each unused one
    (playback, HAR, map-local, sticky cookies, the mitm.it page ...) costs on every call: with
    all 31 defaults the chain walk alone was about a tenth of the proxy's CPU per call.
    Kept: the core and the listeners, the TLS certificates, the guard that refuses clients
    from public addresses when no auth is set (block_global), h2c protection, and Alt-Svc
    rewriting so a gateway client is not sent to the provider's own HTTP/3 port.
    """
    from mitmproxy.addons import (
        block,
        core,
        disable_h2c,
        dns_resolver,
        next_layer,
        proxyserver,
        tlsconfig,
        update_alt_svc,
    )

    class TlsConfig(tlsconfig.TlsConfig):
        """mitmproxy's, without the second read of the CA when the proxy starts: its running()
        reloads the store in case configure never saw `confdir` (a mitmproxy FIXME), but
        Proxy.start always sets it, so the store is there already. Decrypting the CA's key
        costs ~0.1 s."""

        name = "tlsconfig"

        def running(self) -> None:
            if self.certstore is None:
                super().running()

    return [core.Core(), block.Block(), disable_h2c.DisableH2C(), proxyserver.Proxyserver(),
            dns_resolver.DnsResolver(), next_layer.NextLayer(), TlsConfig(), update_alt_svc.UpdateAltSvc()]


class Proxy:
    """The running proxy. `await start()`, then `await wait()`; `stop()` is safe from signals."""

    def __init__(self, config: RunConfig, sink: Sink,
                 on_finished: Callable[[CallFinished], None] | None = None) -> None:
        self.config = config
        self.sink = sink
        try:
            self.rules = RulesHolder(config.rules_path, self._rules_changed)
        except rules_mod.RulesError as exc:
            raise StartupError(str(exc)) from None
        self.relay = Relay(sink, cooldown=Cooldown(seconds=getattr(self.rules.current, "cooldown_s", 30.0)),
                           on_finished=on_finished, body_limit=config.body_limit)
        self.master: mitm_master.Master | None = None
        self._tasks: list[asyncio.Task] = []
        self.proxy_addr: tuple[str, int] | None = None
        self.gateway_addr: tuple[str, int] | None = None

    def _rules_changed(self, rules: rules_mod.Rules) -> None:
        if self.master is not None:
            self.master.options.update(allow_hosts=allow_hosts(rules, self.relay.port))

    async def start(self) -> None:
        relay_port = await self.relay.start()
        opts = mitm_options.Options()
        master = mitm_master.Master(opts, event_loop=asyncio.get_running_loop())
        master.addons.add(*_mitm_addons())
        http1guard.install()
        master.addons.add(Router(self.relay, self.rules, self.config.security()))
        modes: list[str] = []
        if self.config.proxy is not None:
            host, port = self.config.proxy
            modes.append(f"regular@{_fmt_host(host)}:{port}")
        if self.config.gateway is not None:
            host, port = self.config.gateway
            modes.append(f"reverse:http://127.0.0.1:{relay_port}@{_fmt_host(host)}:{port}")
        from llmtap.paths import private_ca_dir

        private_ca_dir(self.config.confdir)  # mitmproxy makes its CA (and key) there
        # Options declared by addons exist only once the addons are added.
        opts.update(
            confdir=str(self.config.confdir),
            mode=modes[:1] if len(modes) == 2 and modes[0].endswith(":0") and modes[1].endswith(":0") else modes,
            # Only with lazy do upstream failures reach the addon at all: eager makes regular mode
            # answer CONNECT with a 502 and reverse mode just close.
            connection_strategy="lazy",
            # The gateway checks the Host the client sent (DNS rebinding) and records it, not
            # the relay's address; the relay itself ignores it.
            keep_host_header=True,
            allow_hosts=allow_hosts(self.rules.current, relay_port),
        )
        self.master = master
        ps = master.addons.get("proxyserver")
        # mitmproxy logs each listener that fails, naming the relay behind the gateway; the
        # StartupError below says it once, in the user's terms.
        quiet = _DropAll()
        logging.getLogger(Proxyserver.__module__).addFilter(quiet)
        ok = await ps.setup_servers()
        if ok and len(modes) == 2 and modes[0].endswith(":0") and modes[1].endswith(":0"):
            # mitmproxy refuses two listeners on the same "host:0" even though the OS would
            # give each its own port: start one, pin it to the port it got, then add the other.
            port = next(iter(ps.servers)).listen_addrs[0][1]
            opts.update(mode=[modes[0][:-2] + f":{port}", modes[1]])
            ok = await ps.setup_servers()
        logging.getLogger(Proxyserver.__module__).removeFilter(quiet)
        if not ok:
            problems = [_listen_problem(server) for server in ps.servers if server.last_exception is not None]
            await self.relay.stop()
            raise StartupError("\n".join(problems) or "mitmproxy could not start its listeners")
        for server in ps.servers:
            addrs = server.listen_addrs
            if not addrs:
                continue
            addr = (addrs[0][0], addrs[0][1])
            if server.mode.full_spec.startswith("regular"):
                self.proxy_addr = addr
            else:
                self.gateway_addr = addr
        await master.running()
        if self.config.rules_path is not None:
            self._tasks.append(asyncio.create_task(self.rules.watch(self.config.reload_interval_s)))

    async def wait(self) -> None:
        assert self.master is not None
        await self.master.should_exit.wait()

    def stop(self) -> None:
        if self.master is not None:
            self.master.shutdown()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.master is not None:
            ps = self.master.addons.get("proxyserver")
            self.master.options.update(mode=[], server=False)
            try:
                await ps.servers.update([])
            except Exception:  # already down
                pass
            await _close_client_connections(ps)
            await self.master.done()
        await self.relay.stop()


async def _close_client_connections(ps: Proxyserver, timeout: float = 5.0) -> None:
    """End the connections clients still hold open (an SDK keeps them alive between calls).

    Stopping the listeners leaves them running; the loop would then cancel their tasks at
    exit and asyncio would print a traceback on every clean stop while a tool was connected.
    Cancelling each connection's own handler lets mitmproxy close it the ordinary way.
    """
    for handler in list(ps.connections.values()):
        io = handler.transports.get(handler.client)
        if io is not None and io.handler is not None:
            io.handler.cancel("llmtap is stopping")
    deadline = asyncio.get_running_loop().time() + timeout
    while ps.connections and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)  # mitmproxy offers no event for "all connections closed"


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _listen_problem(server: ServerInstance) -> str:
    """One line for a listener that could not start, named by the flag that sets it."""
    proxy = server.mode.full_spec.startswith("regular")
    flag, what = ("--proxy", "proxy") if proxy else ("--gateway", "gateway")
    addr = f"{_fmt_host(server.mode.listen_host())}:{server.mode.listen_port()}"
    exc = server.last_exception
    # mitmproxy wraps the OS error in one whose text names its own mode; the cause is the OS's.
    cause = exc.__cause__ if exc is not None and isinstance(exc.__cause__, OSError) else exc
    if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
        return f"port {addr} ({what}) is in use by another program; choose another with {flag} HOST:PORT"
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    return f"cannot listen on {addr} ({what}): {reason}; choose another with {flag} HOST:PORT"


def _fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def install_signal_handlers(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop)
        except (NotImplementedError, RuntimeError):  # not on the main thread, or Windows
            pass


async def serve(config: RunConfig, sink: Sink, *, ready: Callable[[Proxy], Awaitable[None] | None] | None = None,
                on_finished: Callable[[CallFinished], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM (or `proxy.stop()`); raises StartupError on a bad start."""
    proxy = Proxy(config, sink, on_finished=on_finished)
    await proxy.start()
    install_signal_handlers(proxy.stop)
    try:
        if ready is not None:
            result = ready(proxy)
            if asyncio.iscoroutine(result):
                await result
        await proxy.wait()
    finally:
        await proxy.close()


def configure_logging(stream=sys.stderr, verbose: bool = False) -> None:
    """llmtap's messages go to stderr; mitmproxy's own chatter only from warnings up."""
    from llmtap.recorder.redact import PrintableFormatter

    handler = logging.StreamHandler(stream)
    # Log messages quote clients and upstreams (hosts, errors): printable text only.
    handler.setFormatter(PrintableFormatter("llmtap: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
