#!/usr/bin/env bash
# The main job on a fresh machine, with all its set-up (venv, install, assets; cached):
#  1. convert torchvision's ImageNet MobileNetV2 to EN and verify it computes the same function;
#  2. fine-tune it on Fashion-MNIST (the packaged recipe quickstart: 5-7 minutes on 2 CPU cores);
#  3. show which normalizers it chose, per layer and per class, with a figure;
#  4. say how to look at the run in TensorBoard.
# Extra arguments are recipe overrides for step 2, e.g. ./scripts/quickstart.sh schedule.epochs=2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
ENORM="${ENORM_VENV:-$PWD/.venv}/bin/enorm"
ASSETS="$("${ENORM_VENV:-$PWD/.venv}/bin/python" -c 'from enorm_cli.cache import assets_dir; print(assets_dir())')"
mkdir -p runs
"$ENORM" convert torchvision:mobilenet_v2 --checkpoint "$ASSETS/mobilenet_v2-b0353104.pth" \
  --out runs/mnv2_en.safetensors --force
"$ENORM" finetune --recipe quickstart --force train.log_with=[tensorboard] "$@"
"$ENORM" inspect runs/quickstart/best.safetensors --data fashion_mnist --samples 512 --by-class \
  --plot runs/quickstart/ratios.png --json runs/quickstart/ratios.json --force
echo "look at the run: .venv/bin/tensorboard --logdir runs/quickstart/logs  (metrics.jsonl has the same numbers)"
