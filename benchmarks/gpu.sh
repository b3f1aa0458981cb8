#!/usr/bin/env bash
# EN on a GPU: the fused node's CUDA step against its CPU step (benchmarks/cuda_check.py), then
# its cost next to the timm original at 224 px, eager and compiled (benchmarks/bench_norm.py);
# each again with the passes over X as Triton kernels (ENORM_TRITON=1, layers/triton_ops.py).
# Without a GPU it says so and exits 0.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # JSON into OUT_DIR (default runs/gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-${ENORM_VENV:-$PWD/.venv}/bin/python}"
[ -x "$PY" ] || PY=python3
OUT="${1:-runs/gpu}"
mkdir -p "$OUT"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device here: benchmarks/gpu.sh measures EN on a GPU (on a CPU: benchmarks/bench_norm.py)"
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
status=0
"$PY" benchmarks/cuda_check.py --json "$OUT/cuda_check.json" || status=$?  # timings even so
"$PY" benchmarks/bench_norm.py --mode full --reps 20 --json "$OUT/bench_cuda.json"
"$PY" benchmarks/bench_norm.py --mode full --reps 20 --models resnet50 mobilenetv2_100 \
  --variants bn en --compile --json "$OUT/bench_cuda_compiled.json"
ENORM_TRITON=1 "$PY" benchmarks/cuda_check.py --json "$OUT/cuda_check_triton.json" || status=$?
ENORM_TRITON=1 "$PY" benchmarks/bench_norm.py --mode full --reps 20 \
  --models resnet50 mobilenetv2_100 --variants bn en --json "$OUT/bench_cuda_triton.json"
exit "$status"
