#!/usr/bin/env bash
# Does EN beat BN and SN? The paper's claims, small-scale, on this machine (about 45 minutes
# on 2 CPU cores): 3 seeds each of
#   - from scratch: timm resnet18 on Fashion-MNIST with BN, SN, EN and the paper's ablations
#     (pi 10, no conv, relu, shared affine);
#   - fine-tuning: torchvision's ImageNet MobileNetV2 (converted) on Fashion-MNIST with BN, SN, EN.
# Results: runs/evidence/*.json, a Markdown table on stdout, runs/evidence/evidence.png.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${ENORM_VENV:-$PWD/.venv}/bin/python"
OUT=runs/evidence
mkdir -p "$OUT"
"$PY" benchmarks/compare_norms.py --setting scratch --seeds 0 1 2 --out "$OUT/runs" --json "$OUT/scratch.json" \
  --variants bn sn en en_pi10 en_noconv en_relu en_shared_affine "$@"
"$PY" benchmarks/compare_norms.py --setting quickstart_10k --seeds 0 1 2 --out "$OUT/runs" \
  --json "$OUT/finetune.json" --variants bn sn en "$@"
"$PY" benchmarks/plot_evidence.py "$OUT/scratch.json" "$OUT/finetune.json" --out "$OUT/evidence.png"
