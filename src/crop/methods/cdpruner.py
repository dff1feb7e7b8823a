"""CDPruner: keep the visual tokens a conditional DPP picks (diverse, and relevant to the instruction), before the LLM."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from crop.config import ConfigMixin, check_keep_tokens
from crop.methods._compose import compose, keep_all
from crop.methods.base import METHODS, PreLLMMethod
from crop.models.base import ImageSpan, VLMAdapter

logger = logging.getLogger(__name__)

RELEVANCES = ("auto", "clip", "llm", "off")
# what follows the question in the prompts the official evaluation never showed the text tower: the chat
# template's generation prompt (LLaVA/Vicuna "ASSISTANT:", Mistral "[/INST]", ChatML "assistant") and the
# short-answer instructions its loaders cut off (model_vqa_loader.py L110, model_vqa_science.py L81)
DEFAULT_SUFFIXES = ("ASSISTANT:", "[/INST]", "assistant", "Answer the question using a single word or phrase.",
                    "Answer with the option's letter from the given choices directly.")
# config ids of the tokens that belong to an image rather than to the instruction (Qwen's vision start/end and
# Gemma 3's begin/end-of-image too)
_IMAGE_TOKEN_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                       "vision_end_token_id", "boi_token_index", "eoi_token_index")
# below this share of the largest initial gain, a residual is rounding noise: the kernel's numerical rank is spent
RESIDUAL_FLOOR = 1e-4
_WARNED_FALLBACK: set[str] = set()


@dataclass
class CDPrunerConfig(ConfigMixin):
    """Config of CDPruner (defaults: the official LLaVA rule where a CLIP text tower is given; see :class:`CDPruner`).

    Args:
        keep_tokens: visual tokens per image that reach the LLM (the official ``visual_token_num``);
            ``None`` keeps every token.
        relevance: where the instruction relevance of each visual token comes from.
            ``"clip"`` (official on LLaVA): the CLIP text tower of ``text_encoder`` embeds the
            instruction, the visual tokens are embedded by the same CLIP's visual projection,
            relevance = minus their mean cosine, min-max normalised. ``"llm"`` (crop's fallback, for
            models without a CLIP tower or without ``text_encoder``): the same formula between the
            projected visual tokens and the LLM's own input embeddings of the instruction's tokens.
            ``"off"``: no conditioning (every token relevance 1, a plain DPP over feature similarity).
            ``"auto"`` (default): ``"clip"`` when ``text_encoder`` is set, else ``"llm"``.
        text_encoder: local path or hub id of the CLIP checkpoint whose vision tower the model uses
            (LLaVA-1.5 / LLaVA-NeXT: ``openai/clip-vit-large-patch14-336``), with its tokenizer. Loaded
            once per process with ``from_pretrained`` (the hub only if it is not cached or local).
        tokenizer: local path or hub id of the *model's* tokenizer, to read the instruction back as
            text for the CLIP tokenizer (``"clip"`` only). ``None``: the model's own
            ``name_or_path`` (what ``from_pretrained`` loaded it from).
        theta: ``None`` (official default): relevance enters the kernel as it is. A value in
            ``(0, 1)``: relevance becomes ``exp(alpha * r)`` with ``alpha = theta / (2 (1 - theta))``,
            the official code's commented-out option (``llava_arch.py`` L163-166).
        negate: the sign of the cosine: ``True`` takes relevance = ``-cos`` (the official CLIP rule),
            ``False`` takes ``+cos``; ``None`` (default): ``True`` for ``"clip"``, ``False`` for
            ``"llm"`` (the minus is a property of CLIP's patch embeddings, not of an LLM's input space).
        strip_suffixes: strings cut from the end of the instruction text (repeatedly, after
            whitespace) before the CLIP tokenizer sees it (``"clip"`` only): the chat template's
            generation prompt and the short-answer instructions the official loaders removed.

    Raises:
        ValueError: on an invalid field, or ``relevance="clip"`` without ``text_encoder``.
    """

    keep_tokens: int | None = 64
    relevance: str = "auto"
    text_encoder: str | None = None
    tokenizer: str | None = None
    theta: float | None = None
    negate: bool | None = None
    strip_suffixes: tuple[str, ...] = DEFAULT_SUFFIXES
    method_name: ClassVar[str] = "cdpruner"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        if self.relevance not in RELEVANCES:
            raise ValueError(f"unknown relevance {self.relevance!r}; choose one of {', '.join(RELEVANCES)}")
        for name in ("text_encoder", "tokenizer"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a local path or hub id (a non-empty string) or None, got {value!r}")
        if self.relevance == "clip" and self.text_encoder is None:
            raise ValueError("cdpruner relevance='clip' needs text_encoder: the local path or hub id of the CLIP "
                             "checkpoint of the model's vision tower (LLaVA-1.5/1.6: openai/clip-vit-large-patch14-336), "
                             "or use relevance='llm'")
        if self.text_encoder is not None and self.relevance in ("llm", "off"):
            raise ValueError(f"text_encoder is only read with relevance='clip' or 'auto', not {self.relevance!r}")
        if self.theta is not None and (isinstance(self.theta, bool) or not isinstance(self.theta, (int, float))
                                       or not 0 < self.theta < 1):
            raise ValueError(f"theta must be None or a number in (0, 1), got {self.theta!r}")
        if self.negate is not None and not isinstance(self.negate, bool):
            raise ValueError(f"negate must be None, True or False, got {self.negate!r}")
        if isinstance(self.strip_suffixes, str):  # one suffix given on the command line
            self.strip_suffixes = (self.strip_suffixes,)
        if not isinstance(self.strip_suffixes, tuple) or not all(isinstance(s, str) and s for s in self.strip_suffixes):
            raise ValueError(f"strip_suffixes must be a tuple of non-empty strings, got {self.strip_suffixes!r}")

    def source(self) -> str:
        """The relevance source this config runs: ``"clip"``, ``"llm"`` or ``"off"`` (``"auto"`` resolved)."""
        if self.relevance != "auto":
            return self.relevance
        return "clip" if self.text_encoder is not None else "llm"

    def negated(self) -> bool:
        """Whether relevance is minus the cosine (see ``negate``)."""
        return self.source() == "clip" if self.negate is None else self.negate


def relevance_weights(raw: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """The official normalisation of raw relevance scores: ``(r - min + 1e-6) / (max - min)``, then ``exp(alpha r)`` with theta.

    Args:
        raw: ``(n,)`` raw scores of one image's tokens (official: minus the mean cosine to the instruction).
        theta: ``None`` or a value in ``(0, 1)`` (see :class:`CDPrunerConfig`).

    Returns:
        ``(n,)`` float32 relevance; all ones when every score is equal (the official formula divides by 0).
    """
    raw = raw.float()
    low, spread = raw.min(), raw.max() - raw.min()  # () both, on the device: no host read
    scaled = (raw - low + 1e-6) / torch.where(spread > 0, spread, torch.ones_like(spread))  # (n,)
    out = torch.where(spread > 0, scaled, torch.ones_like(scaled))
    if theta is not None:
        out = torch.exp(theta / (2 * (1 - theta)) * out)
    return out


def conditional_dpp(units: torch.Tensor, relevance: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The fast greedy MAP inference of the conditional DPP with kernel ``L = diag(r) S diag(r)``, for a batch of images.

    ``S = U U^T`` is the cosine similarity of the tokens. Each step adds the token of largest
    residual gain ``d_j`` (the Cholesky-style update of Chen et al. 2018: a new row
    ``e = (L_j - c_j^T C) / sqrt(d_j)``, then ``d -= e^2``), as the official loop does
    (``llava_arch.py`` L169-181), with ``L``'s rows computed when picked (no ``(n, n)`` matrix).
    Once every remaining gain is below :data:`RESIDUAL_FLOOR` of the largest initial one (the
    kernel's numerical rank is used up: the official loop then takes square roots of negative
    numbers and picks tokens again), the remaining picks go by relevance instead. Runs on the
    device without reading anything back: ``k`` steps of a few batched kernels.

    Args:
        units: ``(B, n, D)`` L2-normalised token features (float32), zero on padding.
        relevance: ``(B, n)`` relevance weights (``> 0`` on real tokens).
        valid: ``(B, n)`` True on real tokens (images of fewer tokens are padded).
        k: tokens to pick per image (at most every image's real token count).

    Returns:
        ``(B, k)`` picked indices per image, in the order they were picked.
    """
    batch, n, _ = units.shape
    device = units.device
    rows = torch.arange(batch, device=device)  # (B,)
    gains = relevance * (units * units).sum(-1) * relevance  # (B, n) diag(L)
    gains = gains.masked_fill(~valid, -torch.inf)
    spare = gains.clone()  # (B, n) the fallback order (relevance); -inf once taken
    largest = gains.amax(dim=1)  # (B,)
    floor = (RESIDUAL_FLOOR * largest)[:, None]  # (B, 1)
    below = (largest + 1)[:, None]  # (B, 1) shifts the fallback scores under every real gain
    columns = units.transpose(1, 2)  # (B, D, n) a view: the similarity row of a pick is one batched product
    cis = torch.zeros(batch, k, n, device=device)  # (B, k, n) the incremental Cholesky rows
    picks = torch.empty(batch, k, dtype=torch.long, device=device)  # (B, k)
    for i in range(k):
        score = torch.where(gains > floor, gains, spare - below)  # (B, n) a real gain beats every fallback score
        j = score.argmax(dim=1)  # (B,)
        picks[:, i] = j
        gain = gains[rows, j]  # (B,)
        ok = gain > floor[:, 0]  # (B,) False: the fallback picked it
        similarity = torch.bmm(units[rows, j][:, None], columns)[:, 0]  # (B, n) S[j]
        row = relevance[rows, j, None] * similarity * relevance  # (B, n) L[j]
        projected = torch.bmm(cis[rows, :i, j][:, None], cis[:, :i])[:, 0]  # (B, n) sum_t c_tj c_t
        e = (row - projected) / gain.clamp_min(torch.finfo(gain.dtype).tiny).sqrt()[:, None]  # (B, n)
        e = torch.where(ok[:, None], e, torch.zeros_like(e))
        cis[:, i] = e
        gains = (gains - e.square()).scatter_(1, j[:, None], -torch.inf)  # a scalar fill: no host copy
        spare.scatter_(1, j[:, None], -torch.inf)
    return picks  # (B, k)


@dataclass
class _ClipSide:
    """What CDPruner uses of a CLIP checkpoint: the tokenizer, text tower + projection, and the image side's last two steps."""

    tokenizer: Any
    text_model: nn.Module
    text_projection: nn.Module
    post_layernorm: nn.LayerNorm
    visual_projection: nn.Linear
    segment: int  # the text tower's positions (77): longer instructions run as several segments

    def to(self, device: torch.device) -> _ClipSide:
        for module in (self.text_model, self.text_projection, self.post_layernorm, self.visual_projection):
            module.to(device)
        return self

    def text_embeds(self, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per text, ``(M, C)`` its CLIP text embeddings, one per 77-token segment (``clip_encoder.py`` L81-89).

        Each text is tokenized alone without truncation and zero-padded to whole segments, as the
        official call does; the segments of all texts run through the tower together.
        """
        ids: list[torch.Tensor] = []
        mask: list[torch.Tensor] = []
        counts: list[int] = []
        for text in texts:
            enc = self.tokenizer(text=text, return_tensors="pt")  # (1, t) each
            pad = -enc["input_ids"].shape[1] % self.segment
            for parts, key in ((ids, "input_ids"), (mask, "attention_mask")):
                value = enc[key]
                parts.append(torch.cat([value, value.new_zeros(1, pad)], dim=1).reshape(-1, self.segment))  # (M, 77)
            counts.append(ids[-1].shape[0])
        both = torch.stack([torch.cat(ids), torch.cat(mask)]).to(device)  # (2, sum M, 77): one copy over
        pooled = self.text_model(input_ids=both[0], attention_mask=both[1]).pooler_output  # (sum M, H)
        return self.text_projection(pooled).float().split(counts)  # per text (M, C)

    def image_embeds(self, pre: torch.Tensor) -> torch.Tensor:
        """``(V, C)`` the visual tokens in CLIP's joint space: post-layernorm, then the visual projection in fp32."""
        norm = self.post_layernorm(pre.to(self.post_layernorm.weight.dtype))  # (V, P)
        return self.visual_projection(norm.float())  # (V, C)


@functools.lru_cache(maxsize=2)
def load_clip_side(source: str) -> _ClipSide:
    """Load a CLIP checkpoint once per process (``CLIPModel`` + its tokenizer) and keep only what CDPruner uses.

    Args:
        source: a local folder or hub id (``from_pretrained``'s argument).

    Raises:
        ValueError: if it cannot be loaded as a CLIP model with a tokenizer.
    """
    from transformers import AutoTokenizer, CLIPModel

    try:
        clip = CLIPModel.from_pretrained(source).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cdpruner could not load text_encoder {source!r} as a CLIP model with its tokenizer: "
                         f"{first}") from None
    side = _ClipSide(tokenizer, clip.text_model, clip.text_projection, clip.vision_model.post_layernorm,
                     clip.visual_projection, int(clip.config.text_config.max_position_embeddings))
    for module in (side.text_model, side.text_projection, side.post_layernorm, side.visual_projection):
        module.requires_grad_(False)
    return side  # the vision encoder is dropped with ``clip``


@functools.lru_cache(maxsize=2)
def load_model_tokenizer(source: str) -> Any:
    """The model's tokenizer (to read its prompt back as text), loaded once per process.

    Raises:
        ValueError: if it cannot be loaded.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cdpruner could not load the model's tokenizer from {source!r} (set tokenizer=...): "
                         f"{first}") from None


def strip_instruction(text: str, suffixes: Sequence[str]) -> str:
    """``text`` without surrounding whitespace and without any of ``suffixes`` at its end (repeatedly)."""
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for suffix in suffixes:
            if text.endswith(suffix):
                text, changed = text[:-len(suffix)].strip(), True
    return text


@dataclass
class CDPrunerImage:
    """One image as :meth:`CDPruner.encode` hands it to :meth:`CDPruner.compress_image`.

    Attributes:
        features: ``(length, D)`` the image's features as the LLM would receive them.
        keep: ``(k,)`` sorted span positions of the visual tokens the DPP picked (on the features'
            device); ``None``: keep every token.
        kept: the same positions on the host (read back once for the whole batch).
    """

    features: torch.Tensor
    keep: torch.Tensor | None = None
    kept: list[int] | None = None


@METHODS.register("cdpruner")
class CDPruner(PreLLMMethod):
    """CDPruner: keep the subset of visual tokens of maximal conditional diversity, a DPP conditioned on the instruction.

    Paper: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for
    Token Pruning in MLLMs" (NeurIPS 2025, arXiv 2506.10967). Stage: before the LLM,
    training-free, instruction-conditioned. Official code: github.com/Theia-4869/CDPruner at
    commit 9541616c40fcd5625de1cdb8ea6c33c129eb7864 (LLaVA-1.5 path). What it does there:

    * ``llava/model/multimodal_encoder/clip_encoder.py`` L38-48: a second copy of the vision
      tower's CLIP checkpoint is loaded for its ``visual_projection`` and its text tower
      (``CLIPTextModelWithProjection``) and tokenizer; L79-96: the question (the dataset's
      question, without the image token, the chat template or the short-answer instruction:
      ``llava/eval/model_vqa_loader.py`` L108-110, ``texts=question``) is tokenized without
      truncation, zero-padded to a multiple of 77 and cut into 77-token segments, each embedded
      (``text_embeds``, ``(M, C)``); the image side is ``hidden_states[-2]`` (LLaVA's
      ``mm_vision_select_layer``, patches only) through the tower's ``post_layernorm`` and the
      ``visual_projection`` in fp32 (``(N, C)``);
    * ``llava/model/llava_arch.py`` L141-187 (``encode_images``): features after the projector
      (the tokens the LLM would get) give the similarity ``S`` = cosine of L2-normalised
      features (L150-153); relevance ``r = -mean_m cos(image_embeds_n, text_embeds_m)``, min-max
      normalised as ``(r - min + 1e-6) / (max - min)`` (L155-160); kernel ``L = r_i S_ij r_j``
      (L167; the ``theta``/``exp(alpha r)`` variant is commented out, L163-166); then the fast
      greedy MAP inference (L169-181): ``visual_token_num`` steps of argmax of the residual
      gains ``d``, a new Cholesky row ``e = (L_j - sum_t c_tj c_t) / sqrt(d_j)``, ``d -= e^2``,
      ``d_j = -inf``; the picks are sorted (L183-185) and ``image_features[index_masks]`` reach the
      LLM in image order at consecutive positions (L274-275, the rest of
      ``prepare_inputs_labels_for_multimodal``).

    The budget is ``keep_tokens`` visual tokens per image reaching the LLM, so the default
    :meth:`planned_counts` (``keep_tokens`` at every layer) feeds matched compute.

    Deviations, and why (each is an option of :class:`CDPrunerConfig` unless it is a guard):

    1. The text encoder (``text_encoder``, ``relevance``): Hugging Face VLMs ship no CLIP text
       tower, so the official relevance needs the CLIP checkpoint named by ``text_encoder``
       (loaded once with ``from_pretrained``; nothing is downloaded by crop itself). Without one
       (``relevance="auto"``), and on architectures whose vision tower is no CLIP (Qwen2-VL,
       Qwen2.5-VL, Qwen3-VL, with no aligned text tower at all), relevance is crop's documented
       fallback ``"llm"``: the same formula between the projected visual tokens (the LLM's input
       space) and the LLM's own input embeddings of the instruction's tokens, with ``+cos``
       (``negate``; the official minus is a property of CLIP's patch embeddings, not of an LLM's
       input space; on crop's embedded answerer ``-cos`` kept clearly less accuracy than
       ``+cos``). The official repository has no Qwen path. ``"off"`` drops the conditioning
       (a plain DPP over feature similarity).
    2. The instruction (``tokenizer``, ``strip_suffixes``): methods see the prompt, not the
       dataset's question, so ``"clip"`` decodes the prompt's text tokens after the image (other
       images, padding and special tokens left out) with the model's tokenizer and strips the
       generation prompt and short-answer instructions from its end; ``"llm"`` embeds those
       tokens as they are (template tokens after the question included).
    3. Kernel conditioning: with ``theta`` set, relevance is ``exp(alpha r)`` (the paper's
       formulation; off in the official code). A constant relevance (e.g. no instruction) is 1
       where the official formula divides by zero.
    4. Guard: when the kernel's numerical rank is spent before ``keep_tokens`` picks (every
       residual gain below :data:`RESIDUAL_FLOOR` of the largest initial gain), the official loop
       takes square roots of negative numbers, picks tokens twice and keeps fewer tokens than
       asked; here the remaining picks go by relevance, so exactly ``keep_tokens`` tokens are
       kept. With LLaVA-1.5's 4096-wide features this never happens at 64-192 of 576 tokens.
    5. Scope: relevance is normalised per image (the official batch, one image per call in its
       evaluation, normalises over all images and tiles of the call); the kernel's rows are
       computed when picked instead of the full ``(n, n)`` kernel (same numbers, ``O(k n)``
       memory, so Qwen images of ~16k tokens fit); similarity, relevance and the DPP in fp32
       (the official normalises the fp16 features before casting); the image side's
       ``post_layernorm`` is the ``text_encoder`` checkpoint's, where the official takes the LLaVA
       tower's own: LLaVA never trains it (it is not on the path of ``hidden_states[-2]``), so in
       LLaVA-1.5 and 1.6 checkpoints they are the same weights.
    6. LLaVA-NeXT: one DPP over an image's base view and high-resolution grid (after unpadding)
       with ``keep_tokens`` for the image, newlines kept iff their row keeps a token. The official
       code gives every tile (base view included) ``visual_token_num`` tokens before unpadding
       (``llava_arch.py`` L199-272, so an image keeps ``5 x`` that at most and fewer after
       unpadding) and keeps every newline; crop's budget is tokens per image, as for every
       method. Qwen2-VL/2.5-VL/3-VL: the kept tokens keep their M-RoPE positions; on Qwen3-VL each
       carries its own DeepStack features (:meth:`CompressedImage.carry`).
    7. A budget at or above an image's visual tokens (or ``None``) keeps the stock inputs.

    Host round trips: per batch, the visual positions go over, the prompt rows come back (the
    instructions), the instructions go over and the kept positions come back, whatever the
    batch size; the prompt is rebuilt per image as for every pre-LLM method. The DPP's steps read
    nothing back (checked on an H200 with ``torch.cuda.set_sync_debug_mode("error")``; the
    official loop's ``di2s[arange(B), j] = -inf`` copies its scalar over at every step). The loop
    is launch-bound (``k`` steps of ~15 small kernels), so the images of a batch run it together.

    Config: :class:`CDPrunerConfig`.

    Args:
        adapter: the model's adapter.
        config: a :class:`CDPrunerConfig`.

    Raises:
        ValueError: if ``"clip"`` relevance is asked of a model without a CLIP vision tower, or
            its text encoder or the model's tokenizer cannot be loaded or does not fit.
    """

    name = "cdpruner"
    config_class = CDPrunerConfig
    config: CDPrunerConfig

    def __init__(self, adapter: VLMAdapter, config: CDPrunerConfig) -> None:
        super().__init__(adapter, config)
        self.source = config.source()
        self._spans: list[ImageSpan] | None = None
        skip = {getattr(adapter.config, f, None) for f in _IMAGE_TOKEN_FIELDS}
        self._not_instruction = sorted(int(t) for t in skip if isinstance(t, int))
        if self.source == "clip":
            self._load_clip()
        elif config.relevance == "auto" and _has_clip_tower(adapter):
            model_type = str(adapter.config.model_type)
            if model_type not in _WARNED_FALLBACK:
                _WARNED_FALLBACK.add(model_type)
                logger.warning("cdpruner on %s without text_encoder: instruction relevance from the LLM's input "
                               "embeddings (crop's fallback); set text_encoder to the vision tower's CLIP checkpoint "
                               "for the official rule", model_type)

    def _load_clip(self) -> None:
        """Load the CLIP side and the model's tokenizer, and check they fit the model (``"clip"`` relevance)."""
        adapter, config = self.adapter, self.config
        if not _has_clip_tower(adapter):
            raise ValueError(f"cdpruner relevance='clip' needs a CLIP vision tower (llava, llava_next); "
                             f"{adapter.config.model_type} has none: use relevance='llm'")
        assert config.text_encoder is not None  # checked by the config
        clip = load_clip_side(config.text_encoder)
        width = int(clip.post_layernorm.weight.shape[0])
        tower = int(adapter.config.vision_config.hidden_size)
        if width != tower:
            raise ValueError(f"cdpruner text_encoder {config.text_encoder!r} has a {width}-wide vision side but the "
                             f"model's vision tower is {tower} wide: give the CLIP checkpoint of its vision tower")
        source = self._tokenizer_source()
        if not source:
            raise ValueError("cdpruner relevance='clip' reads the instruction with the model's tokenizer, but this "
                             "model has no name_or_path: set tokenizer=<its local path or hub id>")
        load_model_tokenizer(source)  # loaded (and checked) now; the method keeps no reference: see _clip

    @property
    def _clip(self) -> _ClipSide | None:
        """The CLIP side (``"clip"``), from the process-wide cache: a removed handle holds none of its tensors."""
        return load_clip_side(self.config.text_encoder) if self.source == "clip" and self.config.text_encoder else None

    def _tokenizer_source(self) -> str:
        """Where the model's tokenizer is read from: ``tokenizer``, else the model's ``name_or_path`` (may be empty)."""
        return self.config.tokenizer or str(getattr(self.adapter.config, "_name_or_path", "") or "")

    @property
    def _tokenizer(self) -> Any:
        """The model's tokenizer (``"clip"``), from the process-wide cache."""
        return load_model_tokenizer(self._tokenizer_source())

    def keeps_everything(self, spans):
        budget = self.config.keep_tokens
        return budget is None or all(budget >= s.visual_tokens for s in spans)

    def selection_flops(self, seq_len, n_in):
        """Normalising the ``n_in`` tokens, the relevance (the LLM-space cosines, or CLIP's image side and text tower
        on one 77-token segment), and per pick one kernel row and its Cholesky update."""
        keep = self.config.keep_tokens
        if keep is None or keep >= n_in:
            return 0
        width = int(self.adapter.text_config.hidden_size)
        text = max(0, seq_len - n_in)
        clip = self._clip
        if clip is not None:
            vision = int(clip.post_layernorm.weight.shape[0])
            joint = int(clip.visual_projection.weight.shape[0])
            tower = sum(p.numel() for p in clip.text_model.parameters())
            relevance = n_in * (8 * vision + 2 * vision * joint) + 2 * tower * clip.segment + 2 * n_in * joint
        elif self.source == "llm":
            relevance = 2 * n_in * text * width + 3 * text * width
        else:
            relevance = 0
        dpp = keep * (2 * n_in * width + 8 * n_in) + keep * keep * n_in
        return 3 * n_in * width + relevance + dpp

    def prepare(self, inputs, spans, boxes):
        self._spans = spans  # spans of this batch, for encode (ints only)
        try:
            return super().prepare(inputs, spans, boxes)
        finally:
            self._spans = None

    def encode(self, inputs: Mapping[str, Any]) -> list[CDPrunerImage]:
        """Per image, its features and the visual tokens the conditional DPP keeps (all images' DPPs run together).

        Host round trips per batch, whatever its size: the visual positions go over once, the
        prompt rows come back once, the instructions go over once, the kept positions come back once.
        """
        spans = self._spans if self._spans is not None else self.adapter.image_spans(inputs)
        pre: Sequence[torch.Tensor | None]
        if self.source == "clip":
            seen = self.adapter.encode_images_with_saliency(inputs)
            features, pre = [s.features for s in seen], [s.pre_projector for s in seen]
        else:
            features = self.adapter.encode_images(inputs)
            pre = [None] * len(features)
        budget = self.config.keep_tokens
        out = [CDPrunerImage(f) for f in features]
        todo = [i for i, s in enumerate(spans) if budget is not None and budget < s.visual_tokens]
        if not todo or budget is None:
            return out
        device = features[todo[0]].device
        positions = [spans[i].visual_positions() for i in todo]  # per image (V,) span positions, on the host
        counts = [p.numel() for p in positions]
        visual = torch.cat(positions).to(device).split(counts)  # per image (V,) on the device
        texts = self._text_embeddings(self._instructions(inputs, [spans[i] for i in todo]), device)
        width = max(counts)
        units = torch.zeros(len(todo), width, features[todo[0]].shape[-1], device=device)  # (B, n, D)
        relevance = torch.ones(len(todo), width, device=device)  # (B, n)
        valid = torch.zeros(len(todo), width, dtype=torch.bool, device=device)  # (B, n)
        for row, (i, where, text) in enumerate(zip(todo, visual, texts, strict=True)):
            tokens = features[i][where].float()  # (V, D)
            n = tokens.shape[0]
            units[row, :n] = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            if text is not None:
                before = pre[i]  # (V, P) pre-projector tokens ("clip"), else None
                image = tokens if before is None else self._clip_image_embeds(before)  # (V, D or C)
                relevance[row, :n] = self._relevance(image, text)
            valid[row, :n] = True
        picks = conditional_dpp(units, relevance, valid, budget)  # (B, k) indices into each image's visual order
        keeps = [where[picks[row]].sort().values for row, where in enumerate(visual)]  # per image (k,) span positions
        kept = torch.cat(keeps).tolist()
        for row, i in enumerate(todo):
            out[i].keep, out[i].kept = keeps[row], kept[row * budget:(row + 1) * budget]
        return out

    def compress_image(self, encoded: CDPrunerImage, span, box, image_index):
        if encoded.keep is None or encoded.kept is None:
            return keep_all(span, encoded.features)
        keep = encoded.keep
        return compose(span, encoded.features, encoded.features[keep], keep), list(encoded.kept)

    # -- relevance -------------------------------------------------------------------------------------

    def _instructions(self, inputs: Mapping[str, Any], spans: Sequence[ImageSpan]) -> list[Any]:
        """Per image, its instruction: the text tokens after it in its prompt (other images, padding left out).

        Returns ``None`` per image for ``"off"``, the decoded and stripped text for ``"clip"``,
        and the token ids (a list) for ``"llm"``. The prompt rows are read back once.
        """
        if self.source == "off":
            return [None for _ in spans]
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        both = ids[:, None] if mask is None else torch.stack([ids, mask.to(ids.dtype)], dim=1)  # (B, 1 or 2, L)
        rows = both.tolist()
        out: list[Any] = []
        for span in spans:
            row = rows[span.sample]
            real = row[1] if mask is not None else [1] * len(row[0])
            after = [t for t, m in zip(row[0][span.start + span.length:], real[span.start + span.length:], strict=True)
                     if m and t not in self._not_instruction]
            if self.source == "clip":
                text = self._tokenizer.decode(after, skip_special_tokens=True)
                out.append(strip_instruction(text, self.config.strip_suffixes))
            else:
                out.append(after)
        return out

    def _text_embeddings(self, instructions: list[Any], device: torch.device) -> list[torch.Tensor | None]:
        """Per image, ``(M, C)`` CLIP text embeddings (``"clip"``), ``(T, D)`` LLM input embeddings (``"llm"``) or ``None``.

        All images' instructions go through the text tower (or the embedding) in one call.
        """
        if self.source == "off":
            return [None for _ in instructions]
        if self.source == "clip":
            clip = self._clip_on(device)
            return list(clip.text_embeds(instructions, device))
        counts = [len(t) for t in instructions]
        flat = torch.tensor([t for text in instructions for t in text], dtype=torch.long).to(device)  # (sum T,)
        embed = cast(nn.Module, cast(Any, self.adapter.model).get_input_embeddings())  # the LLM's token embedding
        embedded = embed(flat).float()  # (sum T, D)
        return list(embedded.split(counts))

    def _clip_on(self, device: torch.device) -> _ClipSide:
        """The CLIP side, on ``device`` (moved only when it is elsewhere)."""
        clip = self._clip
        assert clip is not None
        if clip.post_layernorm.weight.device != device:
            clip.to(device)
        return clip

    def _clip_image_embeds(self, pre: torch.Tensor) -> torch.Tensor:
        """``(V, C)`` one image's pre-projector tokens in CLIP's joint space."""
        return self._clip_on(pre.device).image_embeds(pre)

    def _relevance(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``(V,)`` relevance weights: the official formula between ``image`` ``(V, C)`` and ``text`` ``(M, C)`` embeddings."""
        if text.shape[0] == 0:
            return torch.ones(image.shape[0], device=image.device)
        image = image.float() / image.float().norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        text = text / text.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        cos = (image @ text.T).mean(dim=-1)  # (V,)
        return relevance_weights(-cos if self.config.negated() else cos, self.config.theta)


def _has_clip_tower(adapter: VLMAdapter) -> bool:
    """Whether the model's vision tower is a CLIP one whose pre-projector tokens the adapter hands over (LLaVA-1.5/NeXT)."""
    vision = getattr(adapter.config, "vision_config", None)
    return (getattr(vision, "model_type", None) == "clip_vision_model"
            and type(adapter).encode_images_with_saliency is not VLMAdapter.encode_images_with_saliency)
