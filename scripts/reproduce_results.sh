#!/usr/bin/env bash
# Regenerate every result file quoted in the README (after `bash scripts/setup.sh`).
# The evaluations take about 40 minutes on a 2-core CPU, the benches about 35; each command can run on its own.
# The trained-PLC ablations read the compressors kept in checkpoints/plc-ablations (bash scripts/train_plc.sh
# retrains them, the shipped one and a longer trial, about 40 minutes).
# Usage: bash scripts/reproduce_results.sh [all|evals|benches]     (default all; benches want a quiet machine)
set -euo pipefail
PART=${1:-all}
case "$PART" in all|evals|benches) ;; *) echo "usage: $0 [all|evals|benches]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
CROP=.venv/bin/crop
PY=.venv/bin/python
ALL=full,crop-ilp,crop-plc,crop-plc-trained,fastv,pdrop,sparsevlm,visionzip,dart,random,random-inner,pool

if [[ "$PART" != benches ]]; then
# accuracy on the synthetic benchmark with the default answerer; budgets in each method's own meaning ("label")
$CROP eval --split test --n 400 --methods "$ALL" --keep-tokens 64,128,192 --localizer embedded \
    --out results/eval-embedded-localizer
$CROP eval --split test --n 400 --methods full,crop-ilp,crop-plc,crop-plc-trained,random-inner \
    --keep-tokens 64,128,192 --localizer oracle --out results/eval-oracle-localizer
$PY scripts/readme_accuracy_table.py label results/eval-embedded-localizer/results.json \
    results/eval-oracle-localizer/results.json
# CROP's three ways, per family, with the embedded localizer and the oracle box
$PY scripts/readme_accuracy_table.py compare results/eval-embedded-localizer/results.json \
    crop-plc-trained,crop-plc,crop-ilp oracle=results/eval-oracle-localizer/results.json

# which pruning layer K: ILP, FastV, DART and random-inner at K = 1, 2, 3
bash scripts/k_study.sh embedded results/k-study 400 64,128,192
# what the judge answers when it misses a relation question, unpruned and under CROP-ILP (K = 1, 64 of 576)
$PY scripts/relation_error_study.py results/k-study/k1/results.json --out results/relation-errors/full.md
$PY scripts/relation_error_study.py results/k-study/k1/results.json --method crop-ilp --budget 64 \
    --out results/relation-errors/crop-ilp-64.md

# matched compute: every method solved for the same equivalent visual tokens (K = 1: the first layer of the
# 12-layer default answerer is 1/12 of the compute, so the inner-LLM methods can reach the low targets)
$CROP eval --split test --n 400 --methods "$ALL,crop-self" --keep-tokens 64,128,192 --localizer embedded \
    --match equivalent --layer 1 --out results/eval-matched-equivalent
$PY scripts/readme_accuracy_table.py matched results/eval-matched-equivalent/results.json

# the 2025 state of the art (CDPruner, DivPrune, HoloV) against CROP at matched compute (issue 31); CDPruner runs
# with crop's LLM-embedding relevance here (the embedded answerer has no CLIP text tower)
$CROP eval --split test --n 400 --methods full,crop-ilp,crop-plc,crop-plc-trained,cdpruner,divprune,holov \
    --keep-tokens 64,128,192 --localizer embedded --match equivalent --layer 1 --out results/eval-2025-matched-equivalent
$PY scripts/readme_accuracy_table.py matched results/eval-2025-matched-equivalent/results.json
$CROP eval --split test --n 400 --methods full,crop-ilp,crop-plc,crop-plc-trained,cdpruner,divprune,holov \
    --keep-tokens 192 --localizer embedded --match flops --layer 1 --out results/eval-2025-matched-flops
$PY scripts/readme_accuracy_table.py matched results/eval-2025-matched-flops/results.json

# the same target matched on FLOPs instead, the localizer's included
$CROP eval --split test --n 400 --methods "$ALL" --keep-tokens 192 --localizer embedded --match flops \
    --layer 1 --out results/eval-matched-flops
$PY scripts/readme_accuracy_table.py matched results/eval-matched-flops/results.json

# CROP-ILP's budget policy when the region holds more tokens than the budget: centre blob vs stride,
# at matched compute (K = 1) and per label (K = 2)
$CROP eval --split test --n 400 --methods full,crop-ilp --keep-tokens 192 --localizer embedded --match equivalent \
    --layer 1 --option trim=stride --out results/eval-matched-equivalent-stride
$CROP eval --split test --n 400 --methods full,crop-ilp --keep-tokens 64,128,192 --localizer embedded \
    --option trim=stride --out results/eval-trim-stride
$PY scripts/readme_accuracy_table.py families results/eval-embedded-localizer/results.json \
    results/eval-trim-stride/results.json crop-ilp

# trained PLC: the ablations without the region's anchors and with queries over all tokens (each compressor
# run with the setting it was trained with)
$CROP eval --split test --n 400 --methods full,crop-plc-trained --keep-tokens 64,128,192 --localizer embedded \
    --option compressor=checkpoints/plc-ablations/no-anchors --option anchors=false --out results/eval-plc-no-anchors
$CROP eval --split test --n 400 --methods full,crop-plc-trained --keep-tokens 64,128,192 --localizer embedded \
    --option compressor=checkpoints/plc-ablations/attend-all --option attend=all --out results/eval-plc-attend-all
# ... and the shipped setting trained twice as long at a third of the learning rate
$CROP eval --split test --n 400 --methods full,crop-plc-trained --keep-tokens 64,128,192 --localizer embedded \
    --option compressor=checkpoints/plc-ablations/lr3e-4-2000-steps --out results/eval-plc-lr3e-4
$PY scripts/readme_accuracy_table.py variants crop-plc-trained shipped=results/eval-embedded-localizer/results.json \
    no-anchors=results/eval-plc-no-anchors/results.json queries-over-all=results/eval-plc-attend-all/results.json \
    2000-steps-lr-3e-4=results/eval-plc-lr3e-4/results.json

# CROP-self: the answerer's own attention before layer K as the localizer (no second model)
$PY scripts/self_localizer_study.py --model embedded --layers 1,2,3 --out results/self-localizer-study/embedded
$CROP eval --split test --n 400 --methods full,crop-ilp,crop-self,fastv --keep-tokens 64,128,192 \
    --localizer embedded --out results/eval-crop-self
$PY scripts/readme_accuracy_table.py compare results/eval-crop-self/results.json crop-self,crop-ilp,fastv
fi

if [[ "$PART" != evals ]]; then
# efficiency on a LLaVA-1.5-shaped model with a ~0.5B LM (random weights, realistic proportions); run it on a
# quiet machine (timings are ratios measured in one process, but a busy second core still moves them)
$CROP bench --model llava-shape-0.5b --localizer embedded --methods full,crop-ilp,crop-plc \
    --keep-tokens 64,128,192 --batch 1,4 --repeats 3 --new-tokens 16 --threads 1 --out results/bench-llava-shape-0.5b
# the trained PLC's compressor and CROP-self's captured attention, at 64 of 576, batch 1, more repeats (the
# compressor is an untrained one of the model's width: its cost does not depend on its weights)
$PY scripts/untrained_compressor.py --model llava-shape-0.5b --out runs/compressor-llava-shape-0.5b
$CROP bench --model llava-shape-0.5b --localizer embedded --methods full,crop-ilp,crop-self,crop-plc,crop-plc-trained \
    --option crop-plc-trained.compressor=runs/compressor-llava-shape-0.5b --keep-tokens 64 --batch 1 --repeats 5 \
    --new-tokens 16 --threads 1 --out results/bench-llava-shape-0.5b-costs
# the Qwen family: Qwen3-VL-2B's sizes (DeepStack included), 768 px images = 576 visual tokens, random weights
$CROP bench --model qwen3-vl-shape-2b --localizer embedded --methods full,crop-ilp,crop-plc \
    --keep-tokens 64 --batch 1 --repeats 3 --new-tokens 8 --threads 1 --out results/bench-qwen3-vl-shape-2b
# the vLLM engine (the CPU wheel, float32) with and without pruning: 32 concurrent requests, 64 of 576 tokens
# (needs .venv-vllm: bash scripts/setup_vllm.sh; about 15 minutes)
.venv-vllm/bin/python scripts/bench_vllm.py --repeats 5 --out results/vllm-bench
fi
