#!/usr/bin/env bash
# The main job on a fresh machine: set-up (venv, install, assets; cached), then convert the
# real ImageNet MobileNetV2 to EN and verify it computes the same function.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
ENORM="${ENORM_VENV:-$PWD/.venv}/bin/enorm"
ASSETS="${ENORM_ASSETS:-$PWD/.cache/assets}"
mkdir -p runs
"$ENORM" convert torchvision:mobilenet_v2 --checkpoint "$ASSETS/mobilenet_v2-b0353104.pth" \
  --out runs/mnv2_en.safetensors --force
