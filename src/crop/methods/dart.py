"""DART: drop visual tokens that duplicate a few pivot tokens, inside the LLM at layer K."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from crop.config import ConfigMixin, check_keep_tokens, check_layer
from crop.methods.attention import QKCapture, key_states, rotate
from crop.methods.base import METHODS, InnerLLMMethod
from crop.ops.similarity import duplication_select

BUDGETS = ("official", "exact")


def _check_count(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass
class DARTConfig(ConfigMixin):
    """Config of DART.

    Args:
        keep_tokens: the budget ``M`` per image (see ``budget``); ``None``, or at least the
            image's visual tokens, keeps all.
        layer: the pruning layer K (>= 1); layers ``< K`` see every token (official: 2).
        image_pivots: pivots among the image's visual tokens (official: 4); they are kept.
        text_pivots: pivots among the prompt's text after the image (official: 4); they
            choose visual tokens but are text, so never dropped and not counted.
        budget: how ``keep_tokens`` is counted. ``"official"``: as the official code, each of
            the ``n`` pivots keeps ``keep_tokens // n`` tokens and the image pivots come on top,
            so ``image_pivots + n * (keep_tokens // n)`` visual tokens survive (4 + 8 * 8 = 68
            of 576 for ``keep_tokens=64``). ``"exact"``: exactly ``keep_tokens`` survive, image
            pivots included, the rest shared between the pivots as evenly as possible (the
            first visited take one more); for comparisons at matched compute.

    Raises:
        ValueError: on an invalid field.
    """

    keep_tokens: int | None = 64
    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4
    budget: str = "official"
    method_name: ClassVar[str] = "dart"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        check_layer(self.layer)
        _check_count("image_pivots", self.image_pivots, 1)
        _check_count("text_pivots", self.text_pivots, 0)
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")


@METHODS.register("dart")
class DART(InnerLLMMethod):
    """DART: keep the visual tokens least duplicated by a few pivots; drop the rest at layer K.

    Paper: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More" (2025, arXiv 2502.11494). Stage: inside the LLM, once, at the
    input of layer K (default 2), prefill only; training-free, needs no attention map (SDPA and
    Flash stay on). Kept tokens keep their original positions.

    The rule is the official code's: github.com/ZichenWen1/DART,
    ``llava/model/language_model/modeling_llama_self.py``, ``DART.forward`` L315-368 and
    ``get_retained_image_token`` L397-449, at upstream commit
    5a19452fc173017191c247848673e0bde755695a. Per image:

    1. *Pivots*: the ``image_pivots`` visual tokens and the ``text_pivots`` text tokens after
       the image (the question and "ASSISTANT:") with the largest L1 norm of layer K-1's keys
       after RoPE (all heads concatenated). Official: ``any_states = layer_outputs[-2]`` (L342),
       the attention's ``key_states`` after ``apply_rotary_pos_emb`` (L572; on Qwen3 also after the
       layer's ``k_norm``, see :meth:`DART._key_l1`) and ``repeat_kv``
       (L578), ranked by ``torch.norm(p=1)`` (L424-425); the rotary positions are those of
       ``generate()`` on an unpadded batch of one (``attention_mask.cumsum(-1) - 1``, L1155,
       i.e. ``0..L-1``). Here the keys are rotated at each sample's real-token positions
       ``0..n-1`` whatever positions the forward used (:meth:`DART.key_rotary`).
    2. *Similarity*: cosine between the hidden states entering layer K passed through the LLM's
       final norm (:meth:`crop.models.base.VLMAdapter.final_norm`).
    3. *Greedy*: the pivots are visited in Python ``set`` order of their positions; each keeps
       its quota of the visual tokens (image pivots and earlier picks excluded) least similar
       to it (:func:`crop.ops.similarity.duplication_select`). The image pivots and the picks
       survive; the text pivots were never candidates. Quotas: see ``budget`` in :class:`DARTConfig`.

    Deviations:
        - Read in the fork xqy1111111/DART (its last upstream commit is 5a19452, by the upstream
          author; the file is unchanged there since upstream 9fee9fa): the upstream repository
          could not be mirrored here.
        - Batches, padding and several images: each image has its own pivots; its text pivots
          come from the real (unpadded) text of its sample after it, other images' placeholders
          excluded; "positions" for the visiting order and for the keys' rotary encoding count
          real tokens only (the official code asserts a batch of one, L313, unpadded, where the
          two agree). So the kept set is the same for a prompt alone or left-padded in a batch,
          and in ``forward()`` (whose LLaVA positions count from the first pad) or ``generate()``.
        - The selection runs eagerly (``torch.compiler.disable``) inside a ``torch.compile``'d
          model: dynamo iterates a Python ``set`` in insertion order, not in CPython's order that
          the official code visits its pivots in (L429-434), and would keep other tokens.
        - Key norms and cosines in float32 (official: model dtype, fp16); ties are broken
          towards the lower index (official: ``topk``'s choice).
        - Quotas are clipped to the tokens left (the official code would fail when a budget
          close to the image's size asks for more than there is); fewer text tokens than
          ``text_pivots`` give fewer pivots (the quota divides by the pivots there are).
        - ``budget="exact"`` (not in the official code) for matched-compute comparisons.

    Config: :class:`DARTConfig`.
    """

    name = "dart"
    config_class = DARTConfig
    config: DARTConfig

    def __init__(self, adapter, config) -> None:
        super().__init__(adapter, config)
        self.capture = QKCapture(adapter.attention_parts(config.layer - 1))  # layer K-1's keys decide the pivots
        self.norm = adapter.final_norm()
        self._attention_mask: torch.Tensor | None = None


    def attach(self) -> None:
        self.capture.attach()
        super().attach()

    def detach(self) -> None:
        super().detach()
        self.capture.detach()
        self._attention_mask = None  # a removed method keeps no tensor of the last prompt

    def prepare(self, inputs, spans, boxes):
        mask = inputs.get("attention_mask")
        self._attention_mask = mask.bool() if isinstance(mask, torch.Tensor) else None  # (B, L) False on padding
        self.capture.arm()
        return super().prepare(inputs, spans, boxes)

    def kept_after_stage(self, n_in):
        budget, cfg = self.config.keep_tokens, self.config
        if budget is None or budget >= n_in:
            return n_in
        if cfg.budget == "exact":
            return budget
        pivots = cfg.image_pivots + cfg.text_pivots  # assumes the prompt has text_pivots tokens after the image
        return min(n_in, cfg.image_pivots + pivots * (budget // pivots))

    def select_at_layer(self, stage, hidden, layer_kwargs, candidates):
        batch, seq_len, _ = hidden.shape
        device = hidden.device
        # DART has a single stage, so slot s of ``hidden`` is prompt position s
        _, keys = self.capture.take(seq_len)  # (B, L, Hkv*d) layer K-1's key projections, before k_norm and RoPE
        mask = self._attention_mask
        valid = mask.to(device) if mask is not None and mask.shape == (batch, seq_len) \
            else torch.ones(batch, seq_len, dtype=torch.bool, device=device)  # (B, L)
        cos, sin = self.key_rotary(hidden, layer_kwargs, valid)  # (B|1, L, d) each
        slots_all = torch.arange(seq_len, device=device)  # (L,)
        out = []
        with torch.no_grad():
            for b, per_sample in enumerate(candidates):
                spans = [s for s in self._spans if s.sample == b]  # the same order as ``per_sample``
                placeholder = torch.zeros(seq_len, dtype=torch.bool, device=device)  # (L,) every image's span
                for span in spans:
                    placeholder[span.start:span.start + span.length] = True
                position = valid[b].long().cumsum(0) - 1  # (L,) index among the real tokens
                cb, sb = cos[b if cos.shape[0] > 1 else 0], sin[b if sin.shape[0] > 1 else 0]  # (L, d)
                for span, slots in zip(spans, per_sample, strict=True):
                    budget = self.config.keep_tokens
                    if budget is None or budget >= slots.numel():
                        out.append(torch.arange(slots.numel(), device=slots.device))
                        continue
                    text = ((slots_all >= span.start + span.length) & valid[b] & ~placeholder).nonzero()[:, 0]  # (t,)
                    out.append(self._select_image(hidden[b], keys[b], cb, sb, slots.to(device), text,
                                                  position, budget))
        return out

    def key_rotary(self, hidden: torch.Tensor, layer_kwargs: dict,
                   valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables the pivots' keys are rotated with: each sample's real tokens numbered from 0.

        The official code ranks keys after RoPE (their L1 norm changes with the position), in an
        unpadded batch of one, i.e. at positions ``0..L-1``. The layer's own tables may count from
        the first pad instead (a plain ``forward()`` of a left-padded LLaVA batch numbers every slot,
        ``generate()`` only the real tokens), which would make the kept set depend on the padding;
        so 1-D RoPE tables are recomputed at the real-token positions. M-RoPE models (Qwen2-VL/2.5-VL)
        keep the layer's tables: their 3-D positions (``get_rope_index``) already number real tokens only.

        Args:
            hidden: ``(B, L, D)`` the hidden states entering layer K (dtype and device of the tables).
            layer_kwargs: layer K's keyword arguments (``position_embeddings``).
            valid: ``(B, L)`` False on padding slots.

        Returns:
            ``(cos, sin)``, each ``(B|1, L, d)``.
        """
        if self.adapter.uses_mrope:
            return layer_kwargs["position_embeddings"]
        position = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L) index among the sample's real tokens
        return self.adapter.layer_rotary_embedding(self.config.layer - 1)(hidden, position)  # layer K-1's own tables

    def _selector(self, stage):
        # run the selection eagerly even inside a torch.compile'd model: it reads values back anyway (graph breaks),
        # and dynamo would iterate the pivots' Python set in insertion order, not CPython's hash order the official
        # code visits them in, and silently keep other tokens
        return torch.compiler.disable(super()._selector(stage), recursive=True)

    def _select_image(self, hidden: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      slots: torch.Tensor, text: torch.Tensor, position: torch.Tensor, budget: int) -> torch.Tensor:
        """One image: indices into ``slots`` (its visual tokens) that survive.

        Args:
            hidden: ``(L, D)`` the sample's hidden states entering layer K.
            keys: ``(L, Hkv*d)`` layer K-1's key projections (``k_proj`` outputs: before k_norm and RoPE).
            cos, sin: ``(L, d)`` the rotary tables at the real-token positions (:meth:`key_rotary`).
            slots: ``(v,)`` the image's visual slots; ``text``: ``(t,)`` the text slots after it.
            position: ``(L,)`` each slot's position among the sample's real tokens.
            budget: ``keep_tokens`` (``< v``).
        """
        cfg = self.config
        v = slots.numel()
        n_image = min(cfg.image_pivots, v if cfg.budget == "official" else budget)
        image_pivots = self._key_l1(keys, cos, sin, slots).topk(n_image).indices  # (Pi,) into slots, largest first
        text_pivots = text[self._key_l1(keys, cos, sin, text).topk(min(cfg.text_pivots, text.numel())).indices]  # (Pt,)
        pivot_slots = torch.cat([slots[image_pivots], text_pivots])  # (P,) image pivots first, as the official list
        n = pivot_slots.numel()
        # the official code visits the pivots in Python set order of their sequence indices (hash order, not
        # score order); the visiting order decides which pivot gets a contested token, so reproduce it
        # (a set built from the list, as there: the table size, hence the order, depends on how it was built)
        positions = position[pivot_slots].tolist()
        order = [positions.index(p) for p in set(positions)]
        if cfg.budget == "official":
            quotas = [budget // n] * n
        else:
            rest = budget - n_image
            quotas = [rest // n + (1 if i < rest % n else 0) for i in range(n)]
        normed = self.norm(hidden[torch.cat([slots, text_pivots])])  # (v + Pt, D) the LLM's final norm
        pivot_rows = torch.cat([image_pivots, v + torch.arange(text_pivots.numel(), device=slots.device)])  # (P,)
        taken = torch.zeros(v, dtype=torch.bool, device=slots.device)
        taken[image_pivots] = True  # kept, never picked
        return duplication_select(normed[:v], normed[pivot_rows[order]], quotas, taken)

    def _key_l1(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``(r,)`` L1 norm of layer K-1's key states after RoPE at slots ``rows``, over all key/value heads.

        The official code takes the norm after ``repeat_kv``, which only repeats each key/value
        head ``heads // kv_heads`` times: that multiplies every norm by the same factor, so the
        ranking over the key/value heads is the same.

        The keys are the attention's key states (:func:`crop.methods.attention.key_states`): on
        Qwen3 / Qwen3-VL that includes the layer's per-head ``k_norm`` before RoPE. The official
        rule ranks the ``key_states`` the attention computes (``any_states``), and on those models
        the raw ``k_proj`` output never reaches the attention; its per-head scale is what ``k_norm``
        removes, so without it the ranking would follow projection magnitudes the model ignores.
        On Llama / Qwen2 (no ``k_norm``) nothing changes.
        """
        k = key_states(self.capture.parts, keys[rows])  # (r, Hkv, d) float32, k_norm applied where the layer has one
        k = rotate(k, cos[rows], sin[rows])  # (r, Hkv, d) rotated at the original positions
        return k.abs().sum(dim=(-2, -1))  # (r,)
