// llmtap's preload for Node tools, loaded through NODE_OPTIONS="--require <this file>" by
// `llmtap wrap` and `llmtap env`.
//
// Why it exists: Node's built-in fetch() (what the npm openai and anthropic SDKs use) ignores
// HTTPS_PROXY. Node 24 and 22.21+ honour it when NODE_USE_ENV_PROXY=1 is set (llmtap sets it);
// older Nodes (20 is still common) need an undici EnvHttpProxyAgent installed as fetch's global
// dispatcher, which is what this file does. It changes nothing when no proxy variable is set.
'use strict';

(function installLlmtapProxy() {
  const proxy = process.env.HTTPS_PROXY || process.env.https_proxy;
  if (!proxy) return;
  const [major, minor] = process.versions.node.split('.').map(Number);
  const nativeEnvProxy = major >= 24 || (major === 22 && minor >= 21);
  if (nativeEnvProxy && process.env.NODE_USE_ENV_PROXY === '1') return;

  // undici is looked up in llmtap's own copy first (LLMTAP_UNDICI_DIR, filled by `llmtap wrap`),
  // then wherever the tool itself would find it.
  const where = [process.env.LLMTAP_UNDICI_DIR, process.cwd()].filter(Boolean);
  let undici = null;
  for (const dir of where) {
    try {
      undici = require(require.resolve('undici', { paths: [dir] }));
      break;
    } catch (_) { /* try the next place */ }
  }
  if (!undici || typeof undici.EnvHttpProxyAgent !== 'function') {
    if (!process.env.LLMTAP_NODE_QUIET) {
      process.stderr.write(
        `llmtap: Node ${process.versions.node} ignores HTTPS_PROXY for fetch() and undici was not found, ` +
        'so this tool may bypass llmtap. Run it through `llmtap wrap -- ...` (which installs undici ' +
        'once), or give it the gateway base URL instead.\n');
    }
    return;
  }
  // undici marks EnvHttpProxyAgent experimental and says so on every start; that warning would
  // land in the output of every wrapped tool, so it alone is kept quiet.
  const emit = process.emitWarning;
  process.emitWarning = function (warning, ...rest) {
    const code = typeof rest[0] === 'object' && rest[0] ? rest[0].code : rest[1];
    if (code === 'UNDICI-EHPA') return;
    return emit.call(process, warning, ...rest);
  };
  try {
    undici.setGlobalDispatcher(new undici.EnvHttpProxyAgent());
  } finally {
    process.emitWarning = emit;
  }
})();
