#!/usr/bin/env bash
# Regenerate every result file quoted in the README (after `bash scripts/setup.sh`).
# Takes about an hour on a 2-core CPU; each command can also be run on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
CROP=.venv/bin/crop
ALL=full,crop-ilp,crop-plc,fastv,pdrop,sparsevlm,visionzip,dart,random,random-inner,pool

# accuracy on the synthetic benchmark, embedded answerer; the embedded localizer, then the oracle box (the ceiling)
$CROP eval --split test --n 400 --methods "$ALL" --keep-tokens 64,128,192 --localizer embedded \
    --out results/eval-embedded-localizer
$CROP eval --split test --n 400 --methods full,crop-ilp,crop-plc,random-inner --keep-tokens 64,128,192 \
    --localizer oracle --out results/eval-oracle-localizer
.venv/bin/python scripts/readme_accuracy_table.py results/eval-embedded-localizer/results.json \
    results/eval-oracle-localizer/results.json   # the README's accuracy table

# efficiency on a LLaVA-1.5-shaped model with a ~0.5B LM (random weights, realistic proportions)
$CROP bench --model llava-shape-0.5b --localizer embedded --methods full,crop-ilp,crop-plc \
    --keep-tokens 64,128,192 --batch 1,4 --repeats 3 --new-tokens 16 --threads 1 --out results/bench-llava-shape-0.5b
