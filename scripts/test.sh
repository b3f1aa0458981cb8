#!/usr/bin/env bash
# The test command: set-up (venv, install, assets; cached), ruff, then the whole suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k surgery
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${ENORM_VENV:-$PWD/.venv}"
# Lint and format check first (pyproject's [tool.ruff]): a style slip fails fast, before the suite.
"$VENV/bin/ruff" check --quiet .
"$VENV/bin/ruff" format --check --quiet .
exec "$VENV/bin/python" -m pytest -q "$@"
