#!/usr/bin/env bash
# Sample crop eval / crop answer runs whose outputs must not change under a refactor.
# Usage: bash scripts/sample_evals.sh OUT   (then: python scripts/compare_results.py OUT_BEFORE OUT_AFTER)
# Run it at two commits (e.g. in a `git worktree`) with the same environment; ~10 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: sample_evals.sh OUT}
mkdir -p "$OUT"
C=.venv/bin/crop
$C methods > "$OUT/methods.txt"
$C eval --n 16 --methods full,crop-ilp,crop-plc,crop-plc-trained,fastv,dart,pdrop,sparsevlm,visionzip,pool,random,random-inner \
  --keep-tokens 64 --option dart.budget=exact --option trim=stride --out "$OUT/e1" > /dev/null 2>&1
$C eval --n 16 --methods crop-ilp,fastv,pdrop,visionzip --keep-tokens 64 --match equivalent --layer 1 --out "$OUT/e2" > /dev/null 2>&1
$C eval --n 16 --methods crop-ilp,crop-self,fastv --keep-tokens 64 --localizer self --out "$OUT/e3" > /dev/null 2>&1
$C eval --n 16 --methods crop-ilp,crop-plc --keep-tokens 64,128 --localizer oracle --match flops --pool 8 --out "$OUT/e4" > /dev/null 2>&1
untimed() { python3 -c "import json,sys; d=json.load(sys.stdin); d.pop('timings'); print(json.dumps(d, sort_keys=True))"; }
$C answer --sample "What color is the star?" --json --method crop-plc --pool 2 | untimed > "$OUT/answer1.json"
$C answer --sample "What color is the star?" --json --localizer self | untimed > "$OUT/answer2.json"
$C answer --sample "What color is the star?" --json --method pdrop --option ratio=0.4 --option layers=2,6,9 | untimed > "$OUT/answer3.json"
echo "wrote $OUT"
