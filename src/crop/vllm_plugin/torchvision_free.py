"""Let vLLM's Qwen2-VL model module import where torchvision is absent.

vLLM's ``model_executor/models/qwen2_vl.py`` (and the Qwen2.5-VL / Qwen3-VL modules built on it)
imports ``Qwen2VLImageProcessor`` and ``smart_resize`` from
``transformers.models.qwen2_vl.image_processing_qwen2_vl``, and that transformers module imports
torchvision on its first line. The only torchvision that matches the CPU torch here is a CUDA build
that breaks ``import transformers``, so crop never installs it; transformers itself falls back to
the PIL processor (``image_processing_pil_qwen2_vl``), which has the same ``smart_resize`` and an
image processor with the same outputs.

:func:`serve_qwen2_vl_processor_module` makes that fallback explicit for vLLM's import: when (and
only when) torchvision cannot be found, it registers, under the torchvision module's name, a module
that exposes transformers' own PIL ``smart_resize`` and ``Qwen2VLImageProcessorPil`` (as
``Qwen2VLImageProcessor``). No installed file is edited and no class is changed; where torchvision
is installed (a CUDA machine) it does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
import types

TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"


def serve_qwen2_vl_processor_module() -> bool:
    """Register the PIL stand-in for :data:`TORCHVISION_MODULE` if torchvision is missing.

    Returns:
        Whether the stand-in is in place (False: torchvision is installed, or the module is
        already imported).
    """
    if importlib.util.find_spec("torchvision") is not None or TORCHVISION_MODULE in sys.modules:
        return False
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    stand_in = types.ModuleType(TORCHVISION_MODULE, "transformers' PIL Qwen2-VL image processor (no torchvision here)")
    stand_in.smart_resize = pil.smart_resize  # type: ignore[attr-defined]
    stand_in.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil  # type: ignore[attr-defined]
    sys.modules[TORCHVISION_MODULE] = stand_in
    return True
