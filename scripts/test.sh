#!/usr/bin/env bash
# The test command: set-up (venv, install, assets; cached) then the whole suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k surgery
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${ENORM_VENV:-$PWD/.venv}/bin/python" -m pytest -q "$@"
