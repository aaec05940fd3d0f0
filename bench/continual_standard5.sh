#!/usr/bin/env bash
# The standard five (O-LoRA order 1 + yelp), MiniLM, LoRA q+v r=8, one run per strategy, then one report.
#   bench/continual_standard5.sh [RUNS_DIR] [extra `adaptbank run` flags]
# Defaults: 1,000 train / 100 test examples per task, 1 epoch, 64 tokens, strategies two at a time (1 thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-/tmp/adaptbank-standard5}; shift || true
flags=(--max-train 1000 --max-test 100 --epochs 1 --max-length 64 "$@")
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
mkdir -p "$runs" bench/results
pairs=("bank seq-lora" "shared-a ewc" "replay olora" "joint")
for pair in "${pairs[@]}"; do
  for s in $pair; do
    adaptbank run tasks/runs/standard5-order1.toml --out "$runs/$s" --strategy "$s" "${flags[@]}" > "$runs/$s.log" 2>&1 &
  done
  wait
done
dirs=()
for s in bank shared-a seq-lora ewc replay olora joint; do dirs+=("$runs/$s"); done
adaptbank report "${dirs[@]}" --format md -o bench/results/continual_standard5.md
adaptbank report "${dirs[@]}" --format json -o bench/results/continual_standard5.json
adaptbank report "${dirs[@]}" --format html -o "$runs/report.html"
echo "report: bench/results/continual_standard5.md, $runs/report.html"
