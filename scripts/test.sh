#!/usr/bin/env bash
# The test command: set-up (venv, install, assets; cached) then the whole suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k surgery
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export ENORM_ASSETS="${ENORM_ASSETS:-$PWD/.cache/assets}"
exec "${ENORM_VENV:-$PWD/.venv}/bin/python" -m pytest -q "$@"
