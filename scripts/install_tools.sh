#!/usr/bin/env bash
# Install the real third-party tools that tests/test_real_tools.py drives through llmtap: the
# Cline CLI, the npm openai SDK, and undici (which llmtap's Node preload needs on Node < 22.21).
# They come from the npm registry into .tools/node (LLMTAP_TEST_TOOLS moves it); safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${LLMTAP_TEST_TOOLS:-$PWD/.tools}/node"
if ! command -v npm >/dev/null 2>&1; then
  echo "install_tools.sh: npm is not on PATH; the real-tool tests need Node and npm (apt install nodejs npm)." >&2
  exit 2
fi
if [ -x "$dest/node_modules/.bin/cline" ] && [ -d "$dest/node_modules/openai" ] && [ -d "$dest/node_modules/undici" ]; then
  exit 0
fi
echo "install_tools.sh: installing cline, openai and undici from npm into $dest (a minute or two)"
mkdir -p "$dest"
npm install --prefix "$dest" --no-audit --no-fund --silent cline@3 openai@7 undici@6
