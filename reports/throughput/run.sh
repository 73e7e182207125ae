#!/usr/bin/env bash
# The host side before and after issue 26, in one run on one machine (nothing else running): the loader's
# rows/s, the make-train step fed by the loader vs pre-loaded batches, exact evaluation at 10M and 50M rows,
# and make train's samples/s and test AUC. "Before" is a worktree of $BEFORE sharing this .venv and datasets.
#   BEFORE=546b03e bash reports/throughput/run.sh      (from the project root; ~45 min on 2 cores)
# Writes $OUT (default /tmp/throughput); reports/throughput/table.py prints the report's tables from it.
set -euo pipefail
OUT=${OUT:-/tmp/throughput}
BEFORE=${BEFORE:-546b03e}
PY=$PWD/.venv/bin/python
TORCHRUN="$PWD/.venv/bin/torchrun --standalone"
mkdir -p "$OUT"
B="$OUT/before"
if [ ! -d "$B" ]; then
  git worktree add --detach "$B" "$BEFORE"
  ln -s "$PWD/.venv" "$B/.venv"          # in /tmp, never committed
  ln -s "$PWD/datasets" "$B/datasets"
fi
export OMP_NUM_THREADS=1 TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# The venv installs this checkout in editable mode: without PYTHONPATH the before tree would import our code.
BEFORE_ENV="env PYTHONPATH=$B"
json() { grep '^{' || true; }

# 1. Loader throughput: one pass over the built-in train split (1.5M rows), one decoding core per process.
for bs in 4096 512; do
  # before: the reader's default window (65536 rows; its bench had no option), so after runs it too
  test -s "$OUT/loader_before_$bs.jsonl" || (cd "$B" && $BEFORE_ENV $PY launch/bench.py loader \
      --root datasets/synthetic --batch-size $bs 2>/dev/null | json > "$OUT/loader_before_$bs.jsonl")
  test -s "$OUT/loader_after65536_$bs.jsonl" || $PY launch/bench.py loader --root datasets/synthetic \
      --batch-size $bs --shuffle-buffer 65536 --workers 0,1 2>/dev/null | json > "$OUT/loader_after65536_$bs.jsonl"
  test -s "$OUT/loader_after_$bs.jsonl" || $PY launch/bench.py loader --root datasets/synthetic \
      --batch-size $bs --workers 0,1,2 2>/dev/null | json > "$OUT/loader_after_$bs.jsonl"
done

# 2. The make-train step (batch 512) streamed from the reader vs pre-loaded batches, on 1 and 2 ranks.
for r in 1 2; do
  test -s "$OUT/step_$r.jsonl" || $TORCHRUN --nproc_per_node $r launch/bench.py loader --root datasets/synthetic \
      --in-training --workers 0,1 --steps 200 2>/dev/null | json > "$OUT/step_$r.jsonl"
done

# 3. Exact evaluation: today's gather-all vs the sharded path, 10M and 50M rows on 2 ranks; 1 vs 2 ranks.
test -s "$OUT/eval.json" || $PY launch/bench.py eval --rows 10000000,50000000 --world 2 --json "$OUT/eval.json" \
    > "$OUT/eval.log" 2>&1
test -s "$OUT/eval_scaling.json" || $PY launch/bench.py eval --rows 10000000 --world 1,2 --paths distributed \
    --json "$OUT/eval_scaling.json" > "$OUT/eval_scaling.log" 2>&1

# 4. make train (its exact command: 2 ranks, the built-in data and recipe), before and after.
for v in before after; do
  dir=$PWD; [ $v = before ] && dir=$B
  env=""; [ $v = before ] && env=$BEFORE_ENV
  test -s "$OUT/train_$v/metrics.json" || (cd "$dir" && $env $TORCHRUN --nproc_per_node 2 launch/train.py \
      trainer.run_dir="$OUT/train_$v" trainer.progress_bar=false > "$OUT/train_$v.log" 2>&1)
done
# 5. A real run's evaluation by both codes: the before run's checkpoint on the test split, 2 ranks, gathered
#    (before) vs sharded (after) metrics, compared key by key.
for v in before after; do
  dir=$PWD; [ $v = before ] && dir=$B
  env=""; [ $v = before ] && env=$BEFORE_ENV
  test -s "$OUT/eval_$v/metrics.json" || (cd "$dir" && $env $TORCHRUN --nproc_per_node 2 launch/eval.py \
      checkpoint="$OUT/train_before" output="$OUT/eval_$v" > "$OUT/eval_$v.log" 2>&1)
done
$PY reports/throughput/table.py "$OUT"
