#!/usr/bin/env bash
# The GPU checks, prepared to run once inside a short GPU lease (about 8 minutes on one H200):
#   1. the GPU tests (`pytest -m gpu`: bf16 invariants of the method x architecture matrix on CUDA,
#      pipelines on CUDA and with device_map=auto, the localizers on CUDA, a bench smoke test;
#      FlashAttention-2 cases run only where the flash-attn package is installed);
#   2. the README's and the getting-started page's commands and Python blocks on CUDA as written (hub ids
#      swapped for a tiny checkpoint; `CROP_DOCS_DEVICE=cuda tests/docs/test_snippets.py`);
#   3. `crop bench` in bfloat16 on LLaVA-1.5-7B's full geometry (all 32 decoder layers, random
#      weights, built on the GPU): full vs CROP-ILP and CROP-PLC at 64 and 192 of 576 tokens, batch 1,
#      16 and 64, short answers (8 tokens, as in VQA benchmarks), the embedded localizer's cost included.
# Each step has its own time limit, so one that hangs still leaves the others' files; GPU_TESTS=0,
# DOCS=0 or BENCH=0 skips a step.
#
# Usage (a CUDA machine where `crop` is importable, e.g. PYTHONPATH=src): bash scripts/gpu_check.sh OUT
# Writes OUT/versions.txt, OUT/gpu-tests.{log,xml}, OUT/docs-snippets.{log,xml} and OUT/bench/bench.{json,md,png};
# results/gpu-h200/ holds one run's files.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUT}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{
  "$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0]); print('torch', torch.__version__);
print('transformers', transformers.__version__); print('gpu', torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "crop commit ${CROP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"  # the device copy may carry a stale .git
} 2>&1 | tee "$OUT/versions.txt"

[[ "${GPU_TESTS:-1}" == 1 ]] && timeout "${GPU_TESTS_TIMEOUT:-300}" "$PY" -m pytest -p no:cacheprovider -m gpu -rfEs --junitxml "$OUT/gpu-tests.xml" \
  tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
echo "gpu tests: exit ${PIPESTATUS[0]}"

[[ "${DOCS:-1}" == 1 ]] && CROP_DOCS_DEVICE=cuda timeout "${DOCS_TIMEOUT:-300}" "$PY" -m pytest -p no:cacheprovider -rfEs \
  --junitxml "$OUT/docs-snippets.xml" tests/docs/test_snippets.py 2>&1 | tee "$OUT/docs-snippets.log" | tail -25
echo "docs snippets on CUDA: exit ${PIPESTATUS[0]}"

[[ "${BENCH:-1}" == 1 ]] && timeout "${BENCH_TIMEOUT:-300}" "$PY" -m crop bench --model llava-1.5-7b-geometry-full --device cuda --dtype bfloat16 \
  --localizer embedded --methods full,crop-ilp,crop-plc --keep-tokens 64,192 --batch 1,16,64 --repeats 5 \
  --new-tokens 8 --out "$OUT/bench" 2>&1 | tail -30
echo "bench: exit ${PIPESTATUS[0]}"
