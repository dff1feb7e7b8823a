"""Random checkpoints in the hub layout vLLM reads, for the plugin's tests and its engine bench.

Two facts of vLLM 0.32 on the CPU shape them: its CPU attention takes head sizes 32, 64, 80, ...
(not the tiny models' 16), and its LLaVA loader reads the tower's weights as
``vision_tower.vision_model.*`` (the llava-hf checkpoints' names), which transformers 5.x no longer
writes. Neither module imports vLLM.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from crop.models.tiny import QWEN3_TINY_SHAPE, LlavaShape, QwenShape

VLLM_LLAVA_SHAPE = LlavaShape(text_hidden=128, text_heads=2, text_kv_heads=1, text_intermediate=256,
                              vision_hidden=64, vision_heads=2)
"""LLaVA-1.5 geometry (336 px, 576 tokens per image) at the smallest widths vLLM's CPU attention runs."""
VLLM_QWEN_SHAPE = QwenShape(text_hidden=128, text_heads=2, text_kv_heads=1, text_intermediate=256,
                            vision_hidden=64, vision_heads=2)
"""A tiny Qwen2-VL / Qwen2.5-VL that vLLM's CPU attention runs (head_dim 64)."""
LLAVA_PROCESSOR_FIELDS = {"patch_size": 14, "vision_feature_select_strategy": "default",
                          "num_additional_image_tokens": 1}
QWEN_STOCK_PROCESSOR = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                        "qwen3_vl": "Qwen3VLProcessor"}


def save_vllm_llava(folder: str | Path, shape: LlavaShape = VLLM_LLAVA_SHAPE, seed: int = 0) -> str:
    """Write a seeded random LLaVA-1.5 of ``shape`` to ``folder`` as vLLM and transformers both load it."""
    from safetensors.torch import load_file, save_file

    from crop.models.processors import save_hub_layout
    from crop.models.tiny import build_tiny_llava

    folder = Path(folder)
    model, processor = build_tiny_llava(seed, shape=shape)
    model.save_pretrained(str(folder))
    save_hub_layout(processor, folder, "LlavaProcessor", processor_kwargs=LLAVA_PROCESSOR_FIELDS)
    weights = folder / "model.safetensors"
    renamed = {key if "vision_tower.vision_model." in key else key.replace("vision_tower.", "vision_tower.vision_model.", 1):
               value for key, value in load_file(str(weights)).items()}
    save_file(renamed, str(weights), metadata={"format": "pt"})
    return str(folder)


def save_vllm_qwen(folder: str | Path, version: str, shape: QwenShape = VLLM_QWEN_SHAPE, seed: int = 0) -> str:
    """Write a seeded random Qwen2-VL (``version="qwen2_vl"``), Qwen2.5-VL (``"qwen2_5_vl"``) or Qwen3-VL
    (``"qwen3_vl"``, with ``QWEN3_TINY_SHAPE``'s 16 px patches and 3 DeepStack levels at these widths) to ``folder``."""
    from crop.models.processors import save_hub_layout
    from crop.models.tiny import build_tiny_qwen

    if version == "qwen3_vl" and shape is VLLM_QWEN_SHAPE:
        shape = dataclasses.replace(QWEN3_TINY_SHAPE, text_hidden=shape.text_hidden, text_heads=shape.text_heads,
                                    text_kv_heads=shape.text_kv_heads, text_intermediate=shape.text_intermediate,
                                    vision_hidden=shape.vision_hidden, vision_heads=shape.vision_heads)
    model, processor = build_tiny_qwen(version, seed, shape=shape)
    model.save_pretrained(str(folder))
    save_hub_layout(processor, folder, QWEN_STOCK_PROCESSOR[version], video=True)
    return str(folder)
