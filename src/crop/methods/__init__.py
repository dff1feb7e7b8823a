"""Pruning methods: CROP (ILP, PLC, self) and the baselines, each a small class in :data:`METHODS`.

Build any method's config with :func:`build_config` (name, budget, options); the config's class
selects the method (:func:`method_for`).
"""

from __future__ import annotations

from typing import Any

from crop.methods.base import (
    METHODS,
    InnerLLMMethod,
    NoPruning,
    PreLLMMethod,
    PruneStats,
    PruningMethod,
)
from crop.methods.build import (
    ConfigAt,
    Option,
    build_config,
    check_options_used,
    config_builder,
    config_class,
    config_fields,
    parse_option_value,
)
from crop.methods.names import ALIASES, canonical_name, method_for, method_names

__all__ = ["ALIASES", "METHODS", "ConfigAt", "InnerLLMMethod", "NoPruning", "Option", "PreLLMMethod", "PruneStats",
           "PruningMethod", "build_config", "canonical_name", "check_options_used", "config_builder", "config_class",
           "config_fields", "config_from_dict", "method_for", "method_names", "parse_option_value"]


def config_from_dict(data: dict[str, Any]) -> Any:
    """Rebuild any method's config from its ``to_dict()`` (the ``"method"`` key names the method).

    Raises:
        ValueError: for a missing or unknown method, unknown keys or invalid values.
    """
    if "method" not in data:
        raise ValueError("a method config dict needs a 'method' key (config.to_dict() writes it)")
    cls = config_class(str(data["method"]))
    return cls.from_dict({**data, "method": cls.method_name})
