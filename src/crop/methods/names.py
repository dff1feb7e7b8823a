"""Method names: the registered ones, their aliases, and the one rule that translates an alias."""

from __future__ import annotations

from typing import Any

from crop.methods.base import METHODS, NoPruning, PruningMethod

__all__ = ["ALIASES", "canonical_name", "method_for", "method_names", "register_builtin"]

# short names accepted wherever a method name is (CLI, evaluation); translated once, by canonical_name
ALIASES = {"full": "none", "ilp": "crop-ilp", "plc": "crop-plc", "self": "crop-self"}


def register_builtin() -> None:
    """Import the modules whose classes register themselves in :data:`METHODS` (idempotent)."""
    import crop.methods.cdpruner  # noqa: F401
    import crop.methods.dart  # noqa: F401
    import crop.methods.divprune  # noqa: F401
    import crop.methods.fastv  # noqa: F401
    import crop.methods.holov  # noqa: F401
    import crop.methods.ilp  # noqa: F401
    import crop.methods.pdrop  # noqa: F401
    import crop.methods.plc  # noqa: F401
    import crop.methods.plc_trained  # noqa: F401
    import crop.methods.pool  # noqa: F401
    import crop.methods.random_prune  # noqa: F401
    import crop.methods.region_prune  # noqa: F401
    import crop.methods.self_region  # noqa: F401
    import crop.methods.sparsevlm  # noqa: F401
    import crop.methods.visionzip  # noqa: F401

    if "none" not in METHODS:
        METHODS.register("none")(NoPruning)


def method_names() -> list[str]:
    """Every registered method name (the aliases ``full``, ``ilp``, ``plc``, ``self`` are in :data:`ALIASES`)."""
    register_builtin()
    return METHODS.names()


def canonical_name(name: str) -> str:
    """The registered name for ``name`` or its alias (``full`` -> ``none``, ``ilp`` -> ``crop-ilp`` ...).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    register_builtin()
    registered = ALIASES.get(name, name)
    if registered not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS.names())} "
                         f"(aliases: {', '.join(f'{a}={n}' for a, n in ALIASES.items())})")
    return registered


def method_for(config: Any) -> type[PruningMethod]:
    """The method class a config selects (each method has its own config class).

    Raises:
        ValueError: for an object that is no registered method's config.
    """
    register_builtin()
    return METHODS.for_config(config)
