#!/usr/bin/env bash
# The README's test command, and what CI runs: install llmtap with its test dependencies
# (.venv), the real third-party tools the tests drive (npm: Cline, openai, undici), then run the
# whole suite. Arguments go to pytest (e.g. scripts/test.sh -k gateway).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_tools.sh
exec .venv/bin/python -m pytest "$@"
