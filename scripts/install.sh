#!/usr/bin/env bash
# Make .venv with a Python >= 3.12 (mitmproxy 12 needs it) and install llmtap with its test
# dependencies, editable. Safe to run again: it reuses a good .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

good() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local c
  for c in "${PYTHON:-}" python3.13 python3.12 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && good "$c" && { command -v "$c"; return; }
  done
  # pyenv keeps other versions out of PATH unless selected; look at them directly.
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/3.1[2-9]*/bin/python3; do
      [ -x "$c" ] && good "$c" && { echo "$c"; return; }
    done
  fi
  return 1
}

if [ -x .venv/bin/python ] && good .venv/bin/python; then
  py=.venv/bin/python
else
  base=$(find_python) || {
    echo "install.sh: llmtap needs Python 3.12 or newer (mitmproxy 12 does)." >&2
    echo "  Install one (e.g. 'apt install python3.12-venv' or 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
    exit 2
  }
  echo "install.sh: creating .venv with $base ($("$base" --version))"
  rm -rf .venv
  "$base" -m venv .venv
  py=.venv/bin/python
fi
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet -e '.[test]'
echo "install.sh: ready -- $(.venv/bin/llmtap --version) in .venv"

# Put `llmtap` on the user's PATH: a link in ~/.local/bin (the XDG place for user commands),
# never over a file there that is not a link to this checkout's llmtap.
bindir="${XDG_BIN_HOME:-$HOME/.local/bin}"
link="$bindir/llmtap"
target="$PWD/.venv/bin/llmtap"
if [ -L "$link" ] || [ ! -e "$link" ]; then
  mkdir -p "$bindir" && ln -sfn "$target" "$link"
  case ":$PATH:" in
    *":$bindir:"*) echo "install.sh: \`llmtap\` is on your PATH ($link)" ;;
    *) echo "install.sh: linked $link; $bindir is not on your PATH yet: add"
       echo "    export PATH=\"$bindir:\$PATH\""
       echo "  to your shell's profile (~/.bashrc, ~/.zshrc), or run $target directly" ;;
  esac
else
  echo "install.sh: $link exists and is not llmtap's link; left alone. Run $target, or remove it and rerun."
fi
