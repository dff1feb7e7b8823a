#!/usr/bin/env bash
# Create .venv in the repo root and install crop with its dev extras.
# torch==2.13.0 (the CPU wheel) goes in first, so nothing later pulls a CUDA build;
# torchvision must never be installed (its only matching build breaks `import transformers`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
if .venv/bin/python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torchvision') else 1)"; then
  echo "setup: torchvision is installed in .venv; it breaks transformers with the CPU torch wheel. Remove it:" >&2
  echo "  .venv/bin/python -m pip uninstall -y torchvision" >&2
  exit 1
fi
.venv/bin/python -c "import torch, transformers; print(f'setup: ok (torch {torch.__version__}, transformers {transformers.__version__})')"
