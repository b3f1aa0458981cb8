#!/usr/bin/env bash
# The test command: set-up (venv, install, assets; cached), ruff, the docs site (strict: a broken
# link fails), then the whole suite. The fast tier for the edit-test loop: ./scripts/test.sh -m "not slow"
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k surgery
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${ENORM_VENV:-$PWD/.venv}"
# Lint and format check first (pyproject's [tool.ruff]): a style slip fails fast, before the suite.
"$VENV/bin/ruff" check --quiet .
"$VENV/bin/ruff" format --check --quiet .
site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --quiet --site-dir "$site"
rm -rf "$site"
exec "$VENV/bin/python" -m pytest -q "$@"
