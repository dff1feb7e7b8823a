#!/usr/bin/env bash
# Create .venv-lmms: crop + lmms-eval, for the lmms-eval plugin (`python -m lmms_eval --model crop`).
#
# lmms-eval 0.7.3 hard-requires torchvision and many model-specific packages. torchvision's
# PyPI build breaks `import transformers` beside the CPU torch wheel used here, so this script
# installs lmms-eval without its dependencies and then only what its core (evaluator, tasks,
# loggers) imports. On a GPU machine with a matching torch/torchvision pair, the extra
# `pip install "crop-vlm[lmms]"` installs lmms-eval with all of its dependencies instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-lmms}
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
"$VENV/bin/python" -m pip install --quiet --no-deps "lmms-eval==0.7.3"
# what lmms-eval's core imports (its pyproject lists far more: model backends, audio, video, wandb)
"$VENV/bin/python" -m pip install --quiet $(sed -n 's/^lmms-core: *//p' scripts/lmms_core_requirements.txt)
if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torchvision') else 1)"; then
  echo "setup_lmms: torchvision got installed in $VENV; it breaks transformers with the CPU torch wheel" >&2
  exit 1
fi
"$VENV/bin/python" -c "import lmms_eval.evaluator, lmms_eval.tasks; import crop.lmms; print('setup_lmms: ok')"
