#!/usr/bin/env bash
# Create or reuse .venv, install enorm with its dev extras (idempotent, cached by a stamp),
# then fetch the real assets and build the optional C++ kernel. Sourced by test.sh and
# quickstart.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${ENORM_VENV:-$PWD/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.enorm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch and torchvision first, pinned to the builds this machine's pip has on disk.
  "$VENV/bin/pip" install --quiet "torch==2.14.1" "torchvision==0.29.1" 2> >(grep -v "^WARNING: Location" >&2)
  "$VENV/bin/pip" install --quiet -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2)
  touch "$stamp"
fi
ENORM="$VENV/bin/enorm" bash scripts/fetch_assets.sh
# EN's C++ inference kernel (optional: without a compiler EN keeps its tensor ops). Built
# once per source, flags and torch version; a later call only finds it built.
"$VENV/bin/enorm" build-kernel 2> >(grep -v "No CUDA runtime" >&2) || true
