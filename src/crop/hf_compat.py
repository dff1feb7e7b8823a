"""Where the KV cache lives across transformers versions (5.24 renamed ``past_key_values`` to ``cache``).

Kept in one place so the next rename is one edit. Reading the old name on 5.24+ still works but
logs a deprecation warning, so the new name is tried first.
"""

from __future__ import annotations

from typing import Any


def layer_cache(kwargs: dict) -> Any:
    """The KV cache a decoder layer was called with (forward-pre-hook ``kwargs``), or ``None``."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def generated_cache(out: Any) -> Any:
    """The KV cache of a ``generate(..., return_dict_in_generate=True)`` output."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
