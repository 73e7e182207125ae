#!/usr/bin/env bash
# Raw 64-bit ids at equal table memory (8,000 user rows, 16,000 item rows): modulo hashing vs managed
# collisions with LFU and LRU eviction. Writes /tmp/ids/{data,conf,runs} and prints the table's inputs.
#   bash reports/ids/run.sh   (from the project root; ~15 min on 2 cores)
set -euo pipefail
OUT=${OUT:-/tmp/ids}
mkdir -p "$OUT/conf/data"
test -f "$OUT/data/dataset.json" || .venv/bin/python -m data.build.generate --config conf/data/synthetic_raw.yaml \
    --root "$OUT/data" --rows 400000
cp conf/data/synthetic_raw.yaml "$OUT/conf/data/raw_lfu.yaml"
sed 's/zch: {eviction: lfu}/zch: {eviction: lru}/' conf/data/synthetic_raw.yaml > "$OUT/conf/data/raw_lru.yaml"
sed 's/zch: {eviction: lfu}/hash: true/' conf/data/synthetic_raw.yaml > "$OUT/conf/data/raw_hash.yaml"
for v in hash lfu lru; do
  test -f "$OUT/runs/$v/metrics.json" && continue
  OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2 launch/train.py --config-dir "$OUT/conf" \
      data=raw_$v recipe=synthetic data.root="$OUT/data" trainer.epochs=1 trainer.progress_bar=false \
      trainer.run_dir="$OUT/runs/$v" > "$OUT/$v.log" 2>&1
done
for v in lfu lru; do
  test -f "$OUT/export_$v/manifest.json" || .venv/bin/python launch/export.py checkpoint="$OUT/runs/$v" \
      out="$OUT/export_$v" parity_rows=512 > "$OUT/export_$v.log" 2>&1
done
.venv/bin/python reports/ids/collisions.py "$OUT"
