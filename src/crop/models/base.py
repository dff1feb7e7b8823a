"""What CROP needs to know about a VLM, behind one interface: the adapter.

Methods never reach into a model's submodules; they ask its adapter for the decoder layers,
where each image's visual tokens sit in the prompt, how a region maps onto them, how to
encode images, and how to rebuild inputs after compression. One adapter per HF ``model_type``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from PIL import Image
from torch import nn

from crop.ops.selection import select_tokens, select_tokens_multi
from crop.ops.sequences import resize_runs
from crop.regions import GridBox
from crop.registry import Registry

if TYPE_CHECKING:
    from transformers.modeling_outputs import BaseModelOutputWithPooling


@dataclass(frozen=True)
class TokenGrid:
    """One grid of visual tokens inside an image's placeholder run (for multi-grid images).

    Token ``(r, c)`` sits at span position ``offset + r * row_stride + c``. When
    ``row_stride > cols``, every row is followed by ``row_stride - cols`` *structure* tokens
    (LLaVA-NeXT's image-newline): they carry no image content and are not visual tokens.

    Attributes:
        rows, cols: the grid's shape; the grid covers the whole image.
        offset: span position of token ``(0, 0)``.
        row_stride: span positions from one row's start to the next's (``>= cols``).
    """

    rows: int
    cols: int
    offset: int = 0
    row_stride: int = 0

    @property
    def stride(self) -> int:
        return self.row_stride or self.cols

    def positions(self) -> torch.Tensor:
        """``(rows * cols,)`` span positions of the grid's tokens, row-major."""
        r = torch.arange(self.rows)[:, None]  # (rows, 1)
        c = torch.arange(self.cols)[None, :]  # (1, cols)
        return (self.offset + r * self.stride + c).flatten()  # (rows*cols,)

    def local(self, positions: torch.Tensor) -> torch.Tensor:
        """Row-major grid indices of those ``positions`` (span positions) that are tokens of this grid."""
        rel = positions - self.offset  # (k,)
        inside = (rel >= 0) & (rel < self.rows * self.stride) & (rel % self.stride < self.cols)
        rel = rel[inside]
        return (rel // self.stride) * self.cols + rel % self.stride  # (k',)

    def row_structure(self, rows: torch.Tensor) -> torch.Tensor:
        """Span positions of the structure tokens that end the given rows (empty for plain grids)."""
        extra = torch.arange(self.cols, self.stride)  # (s,)
        return (self.offset + rows[:, None] * self.stride + extra[None, :]).flatten()  # (len(rows) * s,)


@dataclass(frozen=True)
class OverlayPanel:
    """One picture of what a model sees of an image, and the token grid laid over it (see :mod:`crop.viz`).

    Attributes:
        title: what the panel shows (e.g. ``"base view"``), printed over it when there are several.
        picture: the image content the grid covers, at the aspect ratio it is drawn with.
        grid: the token grid; kept tokens are the span positions ``grid.local`` maps into it.
        tile: ``(rows, cols)`` of tokens per tile when the grid is stitched from tiles, else ``None``.
        tile_origin: the grid cell ``(row, col)`` where a tile corner falls (the tiles' padding
            cut off by unpadding moves the first tile boundary off the grid's edge).
    """

    title: str
    picture: Image.Image
    grid: TokenGrid
    tile: tuple[int, int] | None = None
    tile_origin: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class ImageSpan:
    """One image's visual tokens inside a tokenized batch.

    Attributes:
        sample: batch row holding the image.
        start: prompt position of its first placeholder.
        length: number of placeholders the image occupies in the prompt (visual + structure).
        rows, cols: the token grid the box is mapped onto (``rows * cols == length``) for a
            single plain grid; for a multi-grid image, the shape of its first grid.
        grids: for images made of several token grids and/or structure tokens (LLaVA-NeXT:
            base view + unpadded tiles with a newline per row), where each grid sits in the
            span. Empty (the default) means one plain ``rows x cols`` grid filling the span.
    """

    sample: int
    start: int
    length: int
    rows: int
    cols: int
    grids: tuple[TokenGrid, ...] = ()

    @property
    def token_grids(self) -> tuple[TokenGrid, ...]:
        """The image's token grids, in span order (one plain grid unless ``grids`` says otherwise)."""
        return self.grids or (TokenGrid(self.rows, self.cols),)

    @property
    def visual_tokens(self) -> int:
        """Visual tokens of the image (structure tokens such as newlines not counted)."""
        return sum(g.rows * g.cols for g in self.token_grids)

    def visual_positions(self) -> torch.Tensor:
        """``(visual_tokens,)`` span positions of the visual tokens, grid after grid, each row-major."""
        return torch.cat([g.positions() for g in self.token_grids])

    def structure_positions(self, kept: torch.Tensor) -> torch.Tensor:
        """Span positions of the structure tokens that go with the visual tokens ``kept``.

        The rule: a grid row's trailing structure tokens (LLaVA-NeXT's newline) are kept iff
        the row keeps at least one visual token, so every kept row still ends as the LM expects.

        Args:
            kept: ``(k,)`` span positions of the visual tokens that go on.

        Returns:
            Sorted ``(s,)`` span positions (empty for plain grids).
        """
        out = [torch.empty(0, dtype=torch.long)]
        for g in self.grids:
            if g.stride == g.cols:
                continue
            rows = (g.local(kept.cpu()) // g.cols).unique()  # (r,)
            out.append(g.row_structure(rows))
        return torch.cat(out).sort().values


@dataclass
class CompressedImage:
    """One image after pre-LLM compression.

    Attributes:
        tokens: ``(M, D)`` features that reach the LLM.
        source: ``(M,)`` for each of them, the span position of its first source token (for a
            plain grid, its row-major index).
        structure: how many of the ``M`` are structure tokens (newlines), not visual tokens.
        mixing: for images with tokens made from several source tokens (pooled, merged,
            compressed), a function giving the ``(M, span.length)`` weights of the span's tokens
            each output token summarizes (a pooled token: ``1/n`` on each of its block's ``n``
            tokens; a copy: one-hot on its source). ``None``: every token is a copy of its
            source's features. Computed only when an adapter must carry side features along
            (:meth:`carry`), so other models pay nothing for it.
    """

    tokens: torch.Tensor
    source: torch.Tensor
    structure: int = 0
    mixing: Callable[[], torch.Tensor] | None = None

    @property
    def visual_tokens(self) -> int:
        """Visual tokens that reach the LLM (region + pooled), structure tokens not counted."""
        return int(self.tokens.shape[0]) - self.structure

    def carry(self, side: torch.Tensor) -> torch.Tensor:
        """Per-token side features of the span (Qwen3-VL's DeepStack) for the tokens that reach the LLM.

        Each output token gets the side features of what it was made of, mixed as its own
        features were: a copied token its source's row, a pooled or merged one the
        :attr:`mixing` weights over its members.

        Args:
            side: ``(span.length, C)`` one row per span position.

        Returns:
            ``(M, C)``, in the order of :attr:`tokens`.
        """
        if self.mixing is None:
            return side[self.source.to(side.device)]  # (M, C)
        weights = self.mixing().to(side.device, torch.float32)  # (M, length)
        return (weights @ side.float()).to(side.dtype)  # (M, C)


@dataclass(frozen=True)
class AttentionParts:
    """The pieces of one decoder layer's self-attention that attention-scored methods recompute scores from.

    Attributes:
        norm: the layer's pre-attention norm (its input goes through it before ``q_proj``).
        q_proj, k_proj: the query and key projections (``Linear``, outputs ``heads * head_dim``
            and ``kv_heads * head_dim`` wide).
        heads, kv_heads, head_dim: query heads, key/value heads (GQA) and the head width.
        scaling: the softmax scale (``head_dim ** -0.5`` for Llama and Qwen2).
        q_norm, k_norm: per-head norms applied to the projections (viewed as ``(..., heads, head_dim)``)
            before RoPE (Qwen3's ``self_attn.q_norm``/``k_norm``); ``None`` where the layer has none.
    """

    norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None


@dataclass
class VisionSaliency:
    """One image as the vision tower saw it, for methods that rank/merge tokens there (VisionZip).

    Attributes:
        features: ``(length, D)`` the image's features as :meth:`VLMAdapter.encode_images` gives them.
        saliency: ``(V,)`` how much the tower attends to each visual token.
        keys: ``(V, K)`` each visual token's keys in that layer (head-averaged).
        pre_projector: ``(V, P)`` the visual tokens just before the projector; for every token,
            :meth:`VLMAdapter.project_features` of its row is its row of ``features``.
        cls_pre_projector: ``(P,)`` the [CLS] token's features in the same layer and space as
            ``pre_projector`` (project it with :meth:`VLMAdapter.project_features`), for adapters
            that let VisionZip pass [CLS] on to the LLM and order tokens freely (1-D positions,
            one plain grid: LLaVA-1.5). ``None``: no [CLS] (Qwen2-VL/2.5-VL) or not passed on
            (LLaVA-NeXT: one per tile, layout fixed by the packing).
    (All ``V``-indexed tensors follow :meth:`ImageSpan.visual_positions`.)
    """

    features: torch.Tensor
    saliency: torch.Tensor
    keys: torch.Tensor
    pre_projector: torch.Tensor
    cls_pre_projector: torch.Tensor | None = None


def module_list(root: nn.Module, path: str) -> nn.ModuleList:
    """``root``'s submodule at the dotted ``path`` (e.g. ``"model.language_model.layers"``), an ``nn.ModuleList``.

    Raises:
        AttributeError: if there is no module at ``path``.
        TypeError: if the module there is not an ``nn.ModuleList``.
    """
    found = root.get_submodule(path)
    if not isinstance(found, nn.ModuleList):
        raise TypeError(f"{type(root).__name__}.{path} is a {type(found).__name__}, not an nn.ModuleList")
    return found


def image_encoder_outputs(features: list[torch.Tensor]) -> dict[str, BaseModelOutputWithPooling]:
    """``mm_encoder_outputs`` that feed the LM the per-image ``features`` (each ``(M_i, D)``) instead of pixels."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    # HF annotates pooler_output as one Tensor, but its own get_image_features stores the per-image
    # sequence there, and that is what the model's forward reads back from mm_encoder_outputs
    return {"image": BaseModelOutputWithPooling(pooler_output=features)}  # type: ignore[arg-type]


SlotOrigin = Callable[[int, torch.Tensor], torch.Tensor]
"""``(layer, hidden (B, L, D) leaving it) -> (B, L)`` the prompt position each slot holds (-1 on padding)."""


class LayerFeatureRelay(Protocol):
    """Hooks an adapter gives inner-LLM methods to keep in-LM feature additions on the kept tokens (see
    :meth:`VLMAdapter.layer_feature_relay`)."""

    def attach(self) -> None:
        """Register the hooks (idempotent)."""
        ...

    def detach(self) -> None:
        """Remove them; the model is as before :meth:`attach`."""
        ...


class MultimodalModel(Protocol):
    """What adapters call on the inner multimodal model of a ``*ForConditionalGeneration`` (its ``model``).

    Its submodules (``vision_tower``, ``multi_modal_projector``, ``visual``, ``language_model``)
    are reached with ``nn.Module.get_submodule``; this names the methods.
    """

    def get_image_features(self, *args: Any, **kwargs: Any) -> Any:
        """Vision tower + projector; with ``return_dict=True`` its ``pooler_output`` holds one tensor per image."""
        ...


class VLMAdapter(ABC):
    """Model knowledge for one architecture family; instantiate with the model it serves.

    Args:
        model: a ``*ForConditionalGeneration`` instance of a supported ``model_type``.
    """


    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def uses_eager_attention(self) -> bool:
        """Whether the LM builds additive float masks (eager) rather than boolean ones (SDPA)."""
        return getattr(self.text_config, "_attn_implementation", None) == "eager"

    @property
    def uses_flash_attention(self) -> bool:
        """Whether the LM runs FlashAttention (``flash_attention_2``/``_3``), whose layers take a ``(B, L)`` padding
        mask (or none) instead of a 4-D one and infer causality from the order of the unpadded tokens."""
        return "flash_attention" in str(getattr(self.text_config, "_attn_implementation", None) or "")

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The language model's decoder layers, in order."""

    @property
    def uses_mrope(self) -> bool:
        """Whether the LM's rotary positions are multi-dimensional (Qwen2-VL's M-RoPE: (3, B, L) position ids)."""
        return bool((getattr(self.text_config, "rope_parameters", None) or {}).get("mrope_section")
                    or (getattr(self.text_config, "rope_scaling", None) or {}).get("mrope_section"))

    def rotary_embedding(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's ``(cos, sin)`` tables for ``position_ids`` ``(B, L)`` (1-D RoPE), as its layers receive them.

        Raises:
            ValueError: for M-RoPE models (their positions are 3-D).
        """
        if self.uses_mrope:
            raise ValueError(f"{type(self).__name__}: M-RoPE positions are 3-D; 1-D rotary tables do not apply")
        return self.model.get_submodule("model.language_model.rotary_emb")(hidden, position_ids)

    def layer_rotary_embedding(self, layer: int) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Decoder layer ``layer``'s rotary function ``(hidden, position_ids (B, L)) -> (cos, sin)`` (1-D RoPE).

        The default is :meth:`rotary_embedding` for every layer; models whose layers get tables of
        their own (Gemma 3: local and global theta per layer type) override it.
        """
        return self.rotary_embedding

    def final_norm(self) -> nn.Module:
        """The language model's final norm (after its last decoder layer, before the LM head).

        The default is the ``norm`` of the text model that holds :meth:`decoder_layers` in every
        supported architecture (Llama / Qwen2 text models); override it for another layout.
        """
        return self.model.get_submodule("model.language_model.norm")

    def multimodal_model(self) -> MultimodalModel:
        """The ``*ForConditionalGeneration``'s inner multimodal model (``model.model``), for its methods."""
        return cast(MultimodalModel, self.model.get_submodule("model"))

    def attention_parts(self, layer: int) -> AttentionParts:
        """Layer ``layer``'s norm, q/k projections, per-head q/k norms and head geometry (Llama / Qwen2 / Qwen3 text
        decoders by default).

        Raises:
            ValueError: if the layer does not have the Llama-style ``input_layernorm`` + ``self_attn.q_proj``.
        """
        block = self.decoder_layers()[layer]
        attn = getattr(block, "self_attn", None)
        if attn is None or not all(hasattr(m, n) for m, n in ((attn, "q_proj"), (attn, "k_proj"),
                                                               (block, "input_layernorm"))):
            raise ValueError(f"{type(block).__name__} has no Llama-style self_attn.q_proj/k_proj + input_layernorm; "
                             f"override attention_parts() in {type(self).__name__}")
        cfg = self.text_config
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(attn, "head_dim", 0) or getattr(cfg, "head_dim", 0) or cfg.hidden_size // heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        return AttentionParts(block.get_submodule("input_layernorm"), attn.q_proj, attn.k_proj, heads, kv_heads,
                              head_dim, float(getattr(attn, "scaling", head_dim ** -0.5)),
                              q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None))

    def layer_feature_relay(self, slot_origin: SlotOrigin) -> LayerFeatureRelay | None:
        """Hooks that add the model's per-visual-token features after early decoder layers to the tokens still there.

        For models that add vision features inside the LM (Qwen3-VL's DeepStack, see
        :mod:`crop.models.deepstack`), inner-LLM methods attach this while they prune, so the
        features follow the kept tokens. ``None`` (the default): the model adds none.

        Args:
            slot_origin: ``(layer, hidden (B, L, D) leaving it) -> (B, L)`` the prompt position
                of each slot (-1 on padding), from the pruning method.
        """
        return None

    def view_box(self, box: GridBox, image_size: tuple[int, int], image_processor: Any) -> GridBox | None:
        """``box`` (on the whole image) as a box on the image the model actually sees.

        A localizer looks at the whole image; a processor may pad or crop it before the vision
        tower. The default is for processors that only resize (Qwen2-VL, LLaVA-NeXT): the box is
        unchanged.

        Args:
            box: the region on the original image.
            image_size: the original ``(width, height)``.
            image_processor: the model's image processor (its geometry settings are read).

        Returns:
            The region on the model's view, or ``None`` if none of it is visible there.
        """
        return box

    def overlay_panels(self, image: Image.Image, image_processor: Any,
                       token_grid: tuple[int, int]) -> list[OverlayPanel]:
        """What the model sees of ``image``, as pictures with the token grids that cover them (for drawing).

        The default is one panel: :meth:`view_image` covered by the plain ``token_grid``
        (``(rows, cols)``, e.g. a result's ``token_grid``), at the view's own aspect ratio.
        Adapters whose images are several grids (LLaVA-NeXT: base view + tiles) return one
        panel per grid.
        """
        return [OverlayPanel("model view", self.view_image(image, image_processor), TokenGrid(*token_grid))]

    def view_image(self, image: Image.Image, image_processor: Any) -> Image.Image:
        """The picture the model's token grid covers (for drawing), at the view's own size.

        The default is for processors that only resize: the whole image. Adapters whose
        processor pads or crops (LLaVA-1.5) return that padded or cropped view, so kept tokens
        and ``extra["model_view_box"]`` can be drawn where they are.
        """
        return image

    @abstractmethod
    def image_spans(self, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        """Every image's visual-token span in the batch, in the order the images were given."""

    def select(self, span: ImageSpan, box: GridBox, budget: int | None, trim: str = "center") -> torch.Tensor:
        """Indices (within the span) of the visual tokens to keep for ``box`` under ``budget``.

        For a multi-grid span the box maps onto every grid and ``budget`` counts visual tokens
        over all of them (see :func:`crop.ops.selection.select_tokens_multi`); structure tokens
        are never returned (:meth:`ImageSpan.structure_positions` adds them).

        Returns:
            Sorted ``(k,)`` span-relative positions.
        """
        if not span.grids:
            return select_tokens(box, span.rows, span.cols, budget, trim=trim)
        chosen = select_tokens_multi(box, [(g.rows, g.cols) for g in span.grids], budget, trim=trim)  # (k,) visual
        return span.visual_positions()[chosen].sort().values  # (k,)

    @abstractmethod
    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Run the vision tower (+ projector): one ``(length, D)`` tensor per image."""

    def encode_images_with_saliency(self, inputs: Mapping[str, Any]) -> list[VisionSaliency]:
        """:meth:`encode_images` plus, per image, what VisionZip needs from the vision tower.

        Saliency is the [CLS] token's attention in the vision layer the features come from
        (CLIP towers), or a documented substitute where the tower has no [CLS] token.

        Returns:
            One :class:`VisionSaliency` per image.

        Raises:
            NotImplementedError: for adapters that cannot report it.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot report vision-tower saliency")

    def release_encoded(self) -> None:  # noqa: B027  (only adapters that keep something override it)
        """Forget what :meth:`encode_images` kept for :meth:`compressed_inputs` (Qwen3-VL's DeepStack features).

        Pre-LLM methods call it once a batch is prepared or refused, so a handle holds nothing of a
        prompt between calls. The default keeps nothing.
        """

    def project_features(self, pre: torch.Tensor) -> torch.Tensor:
        """Map ``(m, P)`` visual tokens from before the projector (:attr:`VisionSaliency.pre_projector`) to ``(m, D)``."""
        raise NotImplementedError(f"{type(self).__name__} cannot project vision-tower features")

    @abstractmethod
    def compressed_inputs(self, inputs: Mapping[str, Any], spans: list[ImageSpan],
                          images: list[CompressedImage]) -> dict[str, Any]:
        """Model inputs (for ``forward`` or ``generate``) that feed ``images`` instead of the originals."""

    def resized_prompt(self, inputs: Mapping[str, Any], spans: list[ImageSpan],
                       images: list[CompressedImage]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
        """The prompt with each image's placeholder run resized to its compressed image's token count.

        The step every adapter's :meth:`compressed_inputs` starts with (:func:`crop.ops.sequences.resize_runs`
        on the spans' runs, placeholders :attr:`image_token_id`, left padding :meth:`pad_token_id`).

        Returns:
            ``(input_ids (B, L'), attention_mask (B, L'), source (B, L'), starts)``: ``source`` is each
            new position's old one (-1 for new padding and rebuilt placeholders), ``starts[b]`` the new
            start of each of sample ``b``'s runs, in order.
        """
        batch = inputs["input_ids"].shape[0]
        runs: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
        lengths: list[list[int]] = [[] for _ in range(batch)]
        for span, image in zip(spans, images, strict=True):
            runs[span.sample].append((span.start, span.length))
            lengths[span.sample].append(int(image.tokens.shape[0]))
        return resize_runs(inputs["input_ids"], inputs.get("attention_mask"), runs, lengths, self.image_token_id,
                           self.pad_token_id())

    def pad_token_id(self) -> int:
        """The id used to left-pad rebuilt prompts (masked out, so any valid id works)."""
        for cfg in (self.config, self.text_config):
            pad = getattr(cfg, "pad_token_id", None)
            if pad is not None:
                return int(pad)
        return 0


# model type -> adapter class; adapters register themselves (``@ADAPTERS.register("llava")``) and
# :func:`crop.models.get_adapter` imports the built-in ones, as :mod:`crop.methods` does for methods
ADAPTERS: Registry[type[VLMAdapter]] = Registry("model type")
