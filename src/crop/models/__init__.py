"""Model adapters: all model-specific knowledge, one class per Hugging Face ``model_type``.

Each adapter module registers its class in :data:`ADAPTERS` (``@ADAPTERS.register("llava")``),
as methods register in :data:`crop.methods.METHODS`; :func:`get_adapter` imports the built-in
modules once and picks the adapter by ``model.config.model_type``. Adding a model is one adapter
module plus its line in :func:`_register_builtin`.
"""

from __future__ import annotations

from torch import nn

from crop.models.base import ADAPTERS, VLMAdapter

__all__ = ["ADAPTERS", "VLMAdapter", "adapter_names", "get_adapter"]


def _register_builtin() -> None:
    """Import the modules whose adapter classes register themselves in :data:`ADAPTERS`."""
    import crop.models.gemma3  # noqa: F401
    import crop.models.internvl  # noqa: F401
    import crop.models.llava  # noqa: F401
    import crop.models.llava_next  # noqa: F401
    import crop.models.llava_onevision  # noqa: F401
    import crop.models.qwen2_vl  # noqa: F401
    import crop.models.qwen3_vl  # noqa: F401


def adapter_names() -> list[str]:
    """Every supported ``model_type``."""
    _register_builtin()
    return ADAPTERS.names()


def get_adapter(model: nn.Module) -> VLMAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``.

    Raises:
        ValueError: for an unsupported model type, listing the supported ones.
    """
    _register_builtin()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model type {model_type!r} ({type(model).__name__}); supported: {', '.join(ADAPTERS.names())}"
        )
    return ADAPTERS.get(str(model_type))(model)
