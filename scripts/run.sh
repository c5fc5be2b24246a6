#!/usr/bin/env bash
# The README's run command: install llmtap into .venv (the first time; later runs reuse it) and
# start `llmtap run` on its defaults. Arguments go to `llmtap run` (e.g. scripts/run.sh --tui).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/llmtap run "$@"
