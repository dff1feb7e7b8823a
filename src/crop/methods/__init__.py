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

__all__ = ["ALIASES", "METHODS", "InnerLLMMethod", "MethodOptions", "NoPruning", "PreLLMMethod", "PruneStats",
           "PruningMethod", "canonical_name", "config_for", "config_from_dict", "method_for", "method_names"]

# short names accepted wherever a method name is (CLI, evaluation); translated once, by canonical_name
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
    """Every registered method name (the aliases ``full``, ``ilp``, ``plc`` are in :data:`ALIASES`)."""
    _register_builtin()
    return METHODS.names()


def canonical_name(name: str) -> str:
    """The registered name for ``name`` or its alias (``full`` -> ``none``, ``ilp`` -> ``crop-ilp`` ...).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    _register_builtin()
    registered = ALIASES.get(name, name)
    if registered not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS.names())} "
                         f"(aliases: {', '.join(f'{a}={n}' for a, n in ALIASES.items())})")
    return registered


def config_for(name: str, keep_tokens: int | None = None, options: MethodOptions | None = None) -> Any:
    """The config of method ``name`` for a budget and the shared options.

    Args:
        name: a registered method name or an alias (``full``, ``ilp``, ``plc``).
        keep_tokens: the visual-token budget (ignored by ``none``).
        options: layer, pool, grid, seed.

    Raises:
        ValueError: for an unknown name (listing the known ones) or invalid options.
    """
    return METHODS.get(canonical_name(name)).config_from_options(keep_tokens, options or MethodOptions())


def config_from_dict(data: dict[str, Any]) -> Any:
    """Rebuild any method's config from its ``to_dict()`` (the ``"method"`` key names the method).

    Raises:
        ValueError: for a missing or unknown method, unknown keys or invalid values.
    """
    if "method" not in data:
        raise ValueError("a method config dict needs a 'method' key (config.to_dict() writes it)")
    cls = METHODS.get(canonical_name(str(data["method"]))).config_class
    return cls.from_dict({**data, "method": cls.method_name})


def method_for(config: Any) -> type[PruningMethod]:
    """The method class a config selects (each method has its own config class).

    Raises:
        ValueError: for an object that is no registered method's config.
    """
    _register_builtin()
    return METHODS.for_config(config)
