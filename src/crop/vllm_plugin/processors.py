"""The checkpoint's Hugging Face processor for crop's vLLM models, loaded once per process."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def checkpoint_processor(path: str, model_type: str) -> Any:
    """The processor of the checkpoint at ``path``, image-only where the stock one needs torchvision.

    vLLM's own ``ctx.get_hf_processor`` passes the merged ``mm_processor_kwargs`` (the server's
    ``crop`` default among them) to ``from_pretrained``; crop's models read those options
    themselves, so the processor is loaded without them (:func:`crop.models.processors.load_checkpoint_processor`).
    """
    from crop.models.processors import load_checkpoint_processor

    return load_checkpoint_processor(path, model_type)
