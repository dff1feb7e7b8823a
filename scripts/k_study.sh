#!/usr/bin/env bash
# Which pruning layer K does the data support? ILP, FastV, DART and random-inner at K = 1, 2, 3 on one
# answerer (issue 13), then one table of accuracy kept against full per method, budget and K.
# Usage: bash scripts/k_study.sh MODEL OUT_DIR [N] [BUDGETS]   e.g. bash scripts/k_study.sh runs/v2f-export results/k-study 200 64,192
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?model (embedded or an exported folder)}
OUT=${2:?output folder}
N=${3:-400}
BUDGETS=${4:-64,128,192}
for K in 1 2 3; do
  .venv/bin/crop eval --model "$MODEL" --split test --n "$N" --methods full,crop-ilp,fastv,dart,random-inner \
      --keep-tokens "$BUDGETS" --localizer embedded --layer "$K" --out "$OUT/k$K"
done
.venv/bin/python scripts/k_study_table.py "$OUT"/k1/results.json "$OUT"/k2/results.json "$OUT"/k3/results.json \
    | tee "$OUT/k_study.md"
