"""Where a results file came from: package versions, the git commit and the machine.

Recorded in every evaluation and benchmark document, so a number can be traced to the code and
the environment that made it.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def git_hash() -> str | None:
    """The checked-out commit of the source tree crop runs from, or ``None`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    """crop's, torch's, transformers' and Python's versions."""
    import torch
    import transformers

    import crop

    return {"crop": crop.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def machine() -> dict[str, str]:
    """The platform and processor strings of this machine."""
    return {"platform": platform.platform(), "processor": platform.processor()}
