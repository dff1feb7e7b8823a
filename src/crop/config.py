"""Method configs as plain validated data: CROP's configs, and the helpers every method config shares.

Every method config is a dataclass with a ``method_name`` class attribute (its registry name);
``to_dict()`` records that name under ``"method"``, so :func:`crop.methods.config_from_dict`
rebuilds any config from its dict alone, and the method a config selects is found from the
config's class (:func:`crop.methods.method_for`).
"""

from __future__ import annotations

import math
from dataclasses import Field, asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

_Config = TypeVar("_Config", bound="ConfigMixin")


def check_keep_tokens(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` (keep everything) or a positive int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"keep_tokens must be a positive int or None, got {value!r}")


def check_grid(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a region-grid side in ``[1, 64]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(f"grid must be an int in [1, 64], got {value!r}")


def check_trim(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` names a way to cut an oversized region (:data:`crop.ops.selection.TRIMS`)."""
    from crop.ops.selection import TRIMS

    if value not in TRIMS:
        raise ValueError(f"unknown trim {value!r}; choose one of {', '.join(TRIMS)}")


def check_ratio(name: str, value: Any, low_open: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in (0, 1] (or [0, 1] with ``low_open=False``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


class ConfigMixin:
    """``to_dict`` / ``from_dict`` for method config dataclasses (tuples travel as lists).

    Subclasses set the class attribute ``method_name`` (the registry name of their method).
    """

    method_name: ClassVar[str] = ""
    # declared only (never set here): every subclass is a dataclass, so ``asdict``/``fields`` apply to it
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields, plus ``"method"``: the method's registry name."""
        fields_ = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"method": self.method_name, **fields_}

    @classmethod
    def from_dict(cls: type[_Config], data: dict[str, Any]) -> _Config:
        """Build from :meth:`to_dict` output (the ``"method"`` key, if present, must name this config's method).

        Raises:
            ValueError: on unknown keys, another method's name, or invalid values.
        """
        data = dict(data)
        method = data.pop("method", cls.method_name)
        if method != cls.method_name:
            raise ValueError(f"a {cls.__name__} is for method {cls.method_name!r}, not {method!r}; "
                             "use crop.methods.config_from_dict to rebuild any method's config")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def check_layer(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a pruning layer K >= 1 (layers before it see every token)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"layer must be an int >= 1 (layers before it see every token), got {value!r}")


@dataclass
class CropILPConfig(ConfigMixin):
    """Configuration of CROP's inner-LLM pruning (ILP).

    Args:
        keep_tokens: visual tokens per image that survive layer ``layer``. ``None`` keeps
            exactly the region's tokens (the paper's pure variant). Larger regions are trimmed,
            smaller ones grown (:mod:`crop.ops.selection`).
        layer: K (>= 1): layers ``0..K-1`` see every token, later ones text + kept visual tokens.
        grid: side of the region grid the localizer answers on (the paper uses 8).
        trim: how a region holding more tokens than ``keep_tokens`` is cut: ``"center"`` (the
            tokens nearest its centre) or ``"stride"`` (evenly spaced over all of it); see
            :mod:`crop.ops.selection`.

    Raises:
        ValueError: on any invalid field.
    """

    keep_tokens: int | None = None
    layer: int = 2
    grid: int = 8
    trim: str = "center"
    method_name: ClassVar[str] = "crop-ilp"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        check_layer(self.layer)
        check_grid(self.grid)
        check_trim(self.trim)


@dataclass
class CropSelfConfig(ConfigMixin):
    """Configuration of CROP-self: CROP's ILP with the region read off the answerer's own attention.

    No localizer model runs: at the input of layer ``layer`` (K), the attention that the text
    after the image paid to the image's visual tokens in the layers before K is summed per grid
    cell, one contiguous box is chosen from it (:mod:`crop.ops.attention_box`), and ILP keeps
    that box's tokens under the same budget policy as :class:`CropILPConfig`. The box is decided
    inside the one prefill; nothing runs twice.

    Args:
        keep_tokens, layer, grid, trim: as in :class:`CropILPConfig`.
        queries: whose attention counts: ``"last"`` (the prompt's last token, as FastV) or
            ``"text"`` (every text token after the image, averaged).
        attention_layers: ``"last"`` (layer K-1's attention, as FastV) or ``"all"`` (the mean
            over layers 0..K-1).
        rule: how the box is chosen from the cell masses (:data:`crop.ops.attention_box.BOX_RULES`):
            ``"price"`` (maximum-sum sub-rectangle of mass minus ``price`` times the uniform share
            per cell) or ``"share"`` (the smallest box holding ``share`` of the mass).
        price: the per-cell price of ``rule="price"`` (> 0; 1 = the uniform share).
        share: the mass share of ``rule="share"``, in (0, 1].

    The defaults (text queries, layer K-1, the smallest box holding 70% of the mass) are the best
    self boxes at K = 2 on the default answerer's validation split
    (``results/self-localizer-study``); ``results/eval-crop-self`` measures how little that is.

    Raises:
        ValueError: on any invalid field.
    """

    keep_tokens: int | None = None
    layer: int = 2
    grid: int = 8
    trim: str = "center"
    queries: str = "text"
    attention_layers: str = "last"
    rule: str = "share"
    price: float = 1.0
    share: float = 0.7
    method_name: ClassVar[str] = "crop-self"

    def __post_init__(self) -> None:
        from crop.ops.attention_box import BOX_RULES
        from crop.ops.selection import TRIMS

        check_keep_tokens(self.keep_tokens)
        check_layer(self.layer)
        check_grid(self.grid)
        choices = {"trim": TRIMS, "queries": ("last", "text"), "attention_layers": ("last", "all"), "rule": BOX_RULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if isinstance(self.price, bool) or not isinstance(self.price, (int, float)) or not math.isfinite(self.price) \
                or self.price <= 0:
            raise ValueError(f"price must be a finite number > 0, got {self.price!r}")
        check_ratio("share", self.share)

    @classmethod
    def from_ilp(cls, config: CropILPConfig, **choices: Any) -> CropSelfConfig:
        """The CROP-self config with ``config``'s budget, layer, grid and trim (and any other field in ``choices``)."""
        return cls(keep_tokens=config.keep_tokens, layer=config.layer, grid=config.grid, trim=config.trim, **choices)


@dataclass
class CropPLCConfig(ConfigMixin):
    """Configuration of CROP's pre-LLM compression (PLC), training-free.

    Args:
        keep_tokens: visual tokens per image that reach the LLM (region + pooled). ``None``
            keeps the region's tokens plus the pooled context.
        grid: side of the region grid the localizer answers on.
        pool: pooling block, in tokens, for the tokens outside the region (4 = 4x4).

    Raises:
        ValueError: on any invalid field.
    """

    keep_tokens: int | None = None
    grid: int = 8
    pool: int = 4
    method_name: ClassVar[str] = "crop-plc"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        check_grid(self.grid)
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1:
            raise ValueError(f"pool must be an int >= 1, got {self.pool!r}")


@dataclass
class CropPLCTrainedConfig(ConfigMixin):
    """Configuration of CROP's trained PLC: region anchors + tokens from a trained compressor.

    Args:
        keep_tokens: visual tokens per image that reach the LLM (anchors + compressed); required.
        compressor: folder of a trained compressor (``crop train plc``); it belongs to one
            answerer (its token dimension is checked).
        grid: side of the region grid the localizer answers on.
        context_share: share of ``keep_tokens`` made by the compressor (``M``, at least 1, at most
            the compressor's query bank); the rest are the region's anchors ``X_r`` at full
            resolution, chosen as CROP-ILP chooses its tokens (:mod:`crop.ops.selection`).
        anchors: ``False`` is the ablation without anchors (the paper's Table 6): every token
            reaching the LLM is a compressed one (``M = keep_tokens``).
        attend: what the queries read: ``"outside"`` (the tokens that are not anchors; the region
            is already there at full resolution) or ``"all"``.

    Raises:
        ValueError: on any invalid field.
    """

    keep_tokens: int | None = 64
    compressor: str | None = None
    grid: int = 8
    context_share: float = 0.25
    anchors: bool = True
    attend: str = "outside"
    method_name: ClassVar[str] = "crop-plc-trained"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        if self.keep_tokens is None:
            raise ValueError("the trained PLC needs keep_tokens (anchors + compressed tokens per image)")
        check_grid(self.grid)
        check_ratio("context_share", self.context_share)
        if not isinstance(self.anchors, bool):
            raise ValueError(f"anchors must be true or false, got {self.anchors!r}")
        if self.attend not in ("outside", "all"):
            raise ValueError(f"unknown attend {self.attend!r}; choose one of outside, all")
        if self.compressor is not None and not isinstance(self.compressor, str):
            raise ValueError(f"compressor must be a folder path, got {self.compressor!r}")


@dataclass
class NoPruningConfig(ConfigMixin):
    """The unpruned model (the reference every method is compared with); it has no fields."""

    method_name: ClassVar[str] = "none"
