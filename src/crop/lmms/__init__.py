"""lmms-eval integration: the ``crop`` model (:mod:`crop.lmms.model`) and a task on the synthetic split.

lmms-eval finds the model through the ``lmms_eval.models`` entry point, which names
:func:`manifest`; the task files (``tasks/crop_synth.yaml`` + ``tasks/crop_synth_utils.py``)
are written next to a synthetic split by ``crop synth --lmms-task``. This package imports
nothing heavy: lmms-eval is loaded only when it asks for the model.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
SAMPLE_STATS: dict[str, dict[str, float]] = {}  # document id -> what pruning kept, filled by CropLMM


def manifest():
    """The ``ModelManifest`` lmms-eval registers as ``--model crop`` (the entry point calls this)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="crop", simple_class_path="crop.lmms.model.CropLMM")
