"""Print docs/bad_inputs.md: the bad-input cases of tests/test_io.py, run now, with their outcomes.

Usage: .venv/bin/python scripts/bad_inputs_table.py > docs/bad_inputs.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for ``tests``

from tests.test_io import render_table  # noqa: E402

if __name__ == "__main__":
    sys.stdout.write(render_table())
