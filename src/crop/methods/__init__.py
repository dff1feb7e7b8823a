"""Pruning methods: CROP (ILP, PLC) and the baselines, each a small class in :data:`METHODS`."""

from __future__ import annotations

from typing import Any

from crop.methods.base import (
    METHODS,
    InnerLLMMethod,
    MethodOptions,
    NoPruning,
    PreLLMMethod,
    PruneStats,
    PruningMethod,
)

__all__ = ["METHODS", "InnerLLMMethod", "MethodOptions", "NoPruning", "PreLLMMethod", "PruneStats", "PruningMethod",
           "config_for", "method_for", "method_names"]

# short names accepted wherever a method name is (CLI, evaluation)
ALIASES = {"full": "none", "ilp": "crop-ilp", "plc": "crop-plc"}


def _register_builtin() -> None:
    """Import the modules whose classes register themselves in :data:`METHODS`."""
    import crop.methods.dart  # noqa: F401
    import crop.methods.fastv  # noqa: F401
    import crop.methods.ilp  # noqa: F401
    import crop.methods.pdrop  # noqa: F401
    import crop.methods.plc  # noqa: F401
    import crop.methods.pool  # noqa: F401
    import crop.methods.random_prune  # noqa: F401
    import crop.methods.sparsevlm  # noqa: F401
    import crop.methods.visionzip  # noqa: F401

    if "none" not in METHODS:
        METHODS.register("none")(NoPruning)


def method_names() -> list[str]:
    """Every registered method name (plus the aliases ``full``, ``ilp``, ``plc``)."""
    _register_builtin()
    return METHODS.names()


def config_for(name: str, keep_tokens: int | None = None, options: MethodOptions | None = None) -> Any:
    """The config of method ``name`` for a budget and the shared options.

    Args:
        name: a registered method name or an alias (``full``, ``ilp``, ``plc``).
        keep_tokens: the visual-token budget (ignored by ``none``).
        options: layer, pool, grid, seed.

    Raises:
        ValueError: for an unknown name (listing the known ones) or invalid options.
    """
    _register_builtin()
    return METHODS.get(ALIASES.get(name, name)).config_from_options(keep_tokens, options or MethodOptions())


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
