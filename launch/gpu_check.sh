#!/usr/bin/env bash
# The GPU acceptance check (issue 23): run it once on a GPU box, after `make venv STACK=cuda`.
#   launch/gpu_check.sh               every step on the GPUs here: the CUDA stack, NCCL, bf16 (~10 min, 1 GPU)
#   launch/gpu_check.sh --torch-only  a GPU box without TorchRec: the dense arch, LONGER and Sparse-MoE
#                                     benches in bf16 (MFU vs the measured GEMM peak), head logits, AUC at scale
#   launch/gpu_check.sh --cpu         every step that makes sense on gloo, in fp32 and small (tests run it)
# Each step prints one line, `ok   <step>: <figures>`, or `FAIL <step>: <why>` and the script stops.
# OUT=<dir> keeps the runs (default: a temporary dir); PY=<python> (default: .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  --torch-only) MODE=torch-only ;;
  "") ;;
  *) echo "usage: launch/gpu_check.sh [--cpu | --torch-only]" >&2; exit 2 ;;
esac
PY=${PY:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
# torch only: what runs on a GPU box without TorchRec (the benches only on a GPU)
STEPS=(logits auc)
if [ "$MODE" != cpu ]; then
  STEPS+=(dense longer_bench moe)
fi
if [ "$MODE" != torch-only ]; then
  STEPS+=(stack data train sharding resume eval longer predict export)
  if [ "$MODE" = gpu ]; then STEPS+=(sync); fi
fi
echo "gpu_check ($MODE): runs in $OUT"
if [ "$MODE" = cpu ]; then
  # every step in one process: one interpreter start and TorchRec import, not one per step
  "$PY" -m launch.gpu_check "${STEPS[@]}" --mode "$MODE" --out "$OUT"
else
  for step in "${STEPS[@]}"; do "$PY" -m launch.gpu_check "$step" --mode "$MODE" --out "$OUT"; done
fi
echo "gpu_check ($MODE): every step passed"
