"""Let vLLM's Qwen2-VL and LLaVA model modules import where torchvision is absent.

vLLM imports names from two transformers modules that import torchvision on their first line:
``transformers.models.qwen2_vl.image_processing_qwen2_vl`` (``Qwen2VLImageProcessor`` and
``smart_resize``, for ``model_executor/models/qwen2_vl.py`` and the Qwen2.5-VL / Qwen3-VL modules
built on it) and ``transformers.models.pixtral.image_processing_pixtral`` (``_num_image_tokens``,
for ``pixtral.py``, which ``llava.py`` imports). The only torchvision that matches the CPU torch
here is a CUDA build that breaks ``import transformers``, so crop never installs it; transformers
itself falls back to its PIL processors (``image_processing_pil_*``), which have the same helper
functions and image processors with the same outputs.

:func:`serve_pil_processor_modules` makes that fallback explicit for vLLM's imports: when (and only
when) torchvision cannot be found, it registers, under each torchvision module's name, a module that
exposes transformers' own PIL names (the PIL image processor under the stock class name). No
installed file is edited and no class is changed; where torchvision is installed (a CUDA machine)
it does nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

# torchvision-backed transformers module -> (its PIL twin, {name vLLM imports: name in the twin})
STAND_INS = {
    "transformers.models.qwen2_vl.image_processing_qwen2_vl": (
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
        {"smart_resize": "smart_resize", "Qwen2VLImageProcessor": "Qwen2VLImageProcessorPil"}),
    "transformers.models.pixtral.image_processing_pixtral": (
        "transformers.models.pixtral.image_processing_pil_pixtral",
        {"_num_image_tokens": "_num_image_tokens", "PixtralImageProcessor": "PixtralImageProcessorPil"}),
}


def serve_pil_processor_modules() -> list[str]:
    """Register the PIL stand-ins of :data:`STAND_INS` if torchvision is missing.

    Returns:
        The module names given a stand-in by this call (empty: torchvision is installed, or
        every module is already imported).
    """
    if importlib.util.find_spec("torchvision") is not None:
        return []
    served = []
    for name, (twin_name, names) in STAND_INS.items():
        if name in sys.modules:
            continue
        twin = importlib.import_module(twin_name)
        stand_in = types.ModuleType(name, f"transformers' PIL twin {twin_name} (no torchvision here)")
        for exposed, original in names.items():
            setattr(stand_in, exposed, getattr(twin, original))
        sys.modules[name] = stand_in
        served.append(name)
    return served
