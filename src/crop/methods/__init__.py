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
           "PruningMethod", "canonical_name", "config_for", "config_from_dict", "method_for", "method_names",
           "parse_option_value", "with_options"]

# short names accepted wherever a method name is (CLI, evaluation); translated once, by canonical_name
ALIASES = {"full": "none", "ilp": "crop-ilp", "plc": "crop-plc", "self": "crop-self"}


def _register_builtin() -> None:
    """Import the modules whose classes register themselves in :data:`METHODS`."""
    import crop.methods.dart  # noqa: F401
    import crop.methods.fastv  # noqa: F401
    import crop.methods.ilp  # noqa: F401
    import crop.methods.pdrop  # noqa: F401
    import crop.methods.plc  # noqa: F401
    import crop.methods.plc_trained  # noqa: F401
    import crop.methods.pool  # noqa: F401
    import crop.methods.random_prune  # noqa: F401
    import crop.methods.self_region  # noqa: F401
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


def parse_option_value(text: str) -> Any:
    """A command-line option value as Python: ``none``, ``true``/``false``, an int, a float, a comma list (tuple), or text."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if "," in text:
        return tuple(parse_option_value(part) for part in text.split(",") if part.strip())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def with_options(config: Any, options: dict[str, Any]) -> Any:
    """``config`` with some fields replaced (validated again), e.g. ``{"ratio": 0.3}`` from ``--option ratio=0.3``.

    Any field of any method's config is reachable this way, so no method needs a flag of its own.

    Args:
        config: a method config.
        options: field name -> value (strings are parsed with :func:`parse_option_value`).

    Raises:
        ValueError: for a field the config does not have (listing those it has) or an invalid value.
    """
    import dataclasses

    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{config.method_name} has no option {', '.join(unknown)}; its options: {', '.join(sorted(known))}")
    values = {k: parse_option_value(v) if isinstance(v, str) else v for k, v in options.items()}
    return dataclasses.replace(config, **values)
