"""Pruning methods: CROP (ILP, PLC) and the baselines, each a small class in :data:`METHODS`."""

from __future__ import annotations

from typing import Any

from crop.methods.base import METHODS, InnerLLMMethod, NoPruning, PreLLMMethod, PruneStats, PruningMethod

__all__ = ["METHODS", "InnerLLMMethod", "NoPruning", "PreLLMMethod", "PruneStats", "PruningMethod", "method_for"]


def _register_builtin() -> None:
    """Import the modules whose classes register themselves in :data:`METHODS`."""
    import crop.methods.ilp  # noqa: F401
    import crop.methods.plc  # noqa: F401

    if "none" not in METHODS:
        METHODS.register("none")(NoPruning)


def method_for(config: Any) -> type[PruningMethod]:
    """The method class a config selects (``CropConfig.method`` or a baseline config's ``method_name``).

    Raises:
        ValueError: for an unknown method, listing the known ones.
    """
    from crop.config import CropConfig

    _register_builtin()
    if isinstance(config, CropConfig):
        return METHODS.get({"ilp": "crop-ilp", "plc": "crop-plc", "none": "none"}[config.method])
    name = getattr(config, "method_name", None)
    if name is None:
        raise ValueError(f"{type(config).__name__} is not a method config (it has no method_name)")
    return METHODS.get(name)
