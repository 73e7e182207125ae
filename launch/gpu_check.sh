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
step() { "$PY" -m launch.gpu_check "$1" --mode "$MODE" --out "$OUT"; }
echo "gpu_check ($MODE): runs in $OUT"
# torch only: what runs on a GPU box without TorchRec (the benches only on a GPU)
step logits
step auc
if [ "$MODE" != cpu ]; then
  step dense
  step longer_bench
  step moe
fi
if [ "$MODE" != torch-only ]; then
  step stack
  step data
  step train
  step sharding
  step resume
  step eval
  step longer
  step predict
  step export
  if [ "$MODE" = gpu ]; then step sync; fi
fi
echo "gpu_check ($MODE): every step passed"
