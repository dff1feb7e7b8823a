"""Method configs as plain validated data: CropConfig, and the helpers every method config shares."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from crop.ops.selection import SCORES

METHODS = ("ilp", "plc", "none")


def check_keep_tokens(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` (keep everything) or a positive int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"keep_tokens must be a positive int or None, got {value!r}")


def check_grid(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a region-grid side in ``[1, 64]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(f"grid must be an int in [1, 64], got {value!r}")


def check_ratio(name: str, value: Any, low_open: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in (0, 1] (or [0, 1] with ``low_open=False``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


class ConfigMixin:
    """``to_dict`` / ``from_dict`` for method config dataclasses (tuples travel as lists)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from :meth:`to_dict` output.

        Raises:
            ValueError: on unknown keys or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass
class CropConfig(ConfigMixin):
    """Configuration of CROP's pruning stage.

    Args:
        method: ``"ilp"`` (inner-LLM pruning: all tokens for layers < ``layer``, then only text
            and kept visual tokens), ``"plc"`` (pre-LLM compression: region tokens at full
            resolution, the rest average-pooled, before the LLM) or ``"none"`` (no pruning).
        keep_tokens: visual tokens per image that survive layer ``layer`` (ILP) or reach the
            LLM (PLC, region + pooled). ``None`` keeps exactly the region's tokens (plus, for
            PLC, the pooled context). Larger regions are trimmed by ``score``; smaller ones grown.
        layer: ILP's pruning layer K (>= 1): layers ``0..K-1`` see every token.
        grid: side of the region grid the localizer answers on (the paper uses 8).
        pool: PLC's pooling block, in tokens, for the tokens outside the region (4 = 4x4).
        score: how tokens are ranked when a region is trimmed or grown; ``"center"`` ranks by
            distance to the region's centre.

    Raises:
        ValueError: on any invalid field.
    """

    method: str = "ilp"
    keep_tokens: int | None = None
    layer: int = 2
    grid: int = 8
    pool: int = 4
    score: str = "center"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        check_keep_tokens(self.keep_tokens)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1 (layers before it see every token), got {self.layer!r}")
        check_grid(self.grid)
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1:
            raise ValueError(f"pool must be an int >= 1, got {self.pool!r}")
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; choose one of {', '.join(SCORES)}")
