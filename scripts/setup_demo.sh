#!/usr/bin/env bash
# Create .venv-demo: crop with the `demo` extra (Gradio) and Playwright for the browser test.
# Playwright drives the system Chromium (Debian's `chromium` package, /usr/bin/chromium): no
# browser is downloaded. Pass --with-browser to also install that package with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-demo}
if [[ "${1:-}" == "--with-browser" ]] && ! command -v chromium >/dev/null; then
  SUDO=$([[ $(id -u) -eq 0 ]] && echo "" || echo "sudo")
  $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[dev,demo]" "playwright>=1.50"
if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torchvision') else 1)"; then
  echo "setup_demo: torchvision got installed in $VENV; it breaks transformers with the CPU torch wheel" >&2
  exit 1
fi
"$VENV/bin/python" -c "import gradio, crop.demo; print(f'setup_demo: ok (gradio {gradio.__version__})')"
