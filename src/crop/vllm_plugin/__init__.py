"""crop inside vLLM: per-request, question-conditioned pruning of image tokens before the LLM (see plan.py)."""

from __future__ import annotations

# stock architecture name -> crop's class (module:Class, imported lazily by vLLM in each process)
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "crop.vllm_plugin.llava:CropLlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "crop.vllm_plugin.qwen2_vl:CropQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "crop.vllm_plugin.qwen2_vl:CropQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "crop.vllm_plugin.qwen3_vl:CropQwen3VLForConditionalGeneration",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: serve the supported architectures with crop's classes.

    vLLM calls it in every process (idempotent). A checkpoint of a registered architecture then
    runs crop's class, which is the stock model until a request asks for pruning.
    """
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
