"""crop: region-oriented visual token pruning (CROP, EMNLP 2025) for Hugging Face VLMs."""

from __future__ import annotations

__version__ = "0.1.0"
