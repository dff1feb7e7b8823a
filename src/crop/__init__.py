"""crop: region-oriented visual token pruning (CROP, EMNLP 2025) for Hugging Face VLMs.

Public API (imported lazily so ``import crop`` stays light):

- :class:`CropILPConfig`, :class:`CropPLCConfig`, :class:`CropSelfConfig`, :func:`apply_crop` / :class:`CropHandle`: apply
  CROP to a model, reversibly (any method: :func:`apply_method` with its config);
- :class:`CropPipeline`, :class:`CropResult`: localize -> prune -> generate, with stats;
- :class:`GridBox`, :func:`parse_grid_box`: regions on the localizer's grid.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CropILPConfig": "crop.config",
    "CropPLCConfig": "crop.config",
    "CropSelfConfig": "crop.config",
    "NoPruningConfig": "crop.config",
    "apply_crop": "crop.api",
    "apply_method": "crop.api",
    "CropHandle": "crop.api",
    "PruneStats": "crop.api",
    "CropPipeline": "crop.pipeline",
    "CropResult": "crop.pipeline",
    "GridBox": "crop.regions",
    "parse_grid_box": "crop.regions",
    "CropInputError": "crop.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'crop' has no attribute {name!r}")
