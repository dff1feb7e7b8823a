"""crop's recomputed attention equals the model's own, on every architecture (Qwen3's q/k norms included).

The attention-scored methods (FastV, PyramidDrop, SparseVLM, CROP-self) rank visual tokens by
attention rows that :func:`crop.methods.attention.attention_rows` recomputes from a layer's
captured ``q_proj``/``k_proj`` outputs, and DART ranks pivots by the layer's keys after RoPE. Here
the stock eager model runs once per architecture on a left-padded batch of two prompts of
different lengths (``output_attentions=True``, cache on), and both are checked against what the
model itself computed: its attention probabilities and the keys it caches. Qwen3-VL's attention
passes queries and keys through per-head RMSNorms (``q_norm``/``k_norm``) before RoPE; a last
test shows the rows come out wrong without them, so the comparison can fail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from crop.hf_compat import generated_cache
from crop.methods.attention import QKCapture, attention_rows
from crop.methods.dart import DART, DARTConfig
from crop.models import get_adapter
from crop.models.base import AttentionParts, ImageSpan
from tests.conftest import ARCHS, chat_inputs, random_image, tiny

LAYER = 1  # the layer checked (DART's default layer K=2 ranks layer 1's keys)
IMAGES = [random_image(41, (400, 300)), random_image(42, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there to the left of the big red square?"]
QWEN3 = "tiny-random-qwen3-vl"
TOP = 16  # visual tokens compared by rank
# models whose image tokens attend to their whole image (Gemma 3): crop's rows are causal, for text queries only
BIDIRECTIONAL_IMAGES = {"tiny-random-gemma3"}


@dataclass
class StockRun:
    """One eager forward of the stock model and what crop reads from it at :data:`LAYER`.

    Attributes:
        parts: the layer's attention parts (from the adapter).
        q, k: ``(B, L, H*d)``, ``(B, L, Hkv*d)`` the captured projections.
        hidden: ``(B, L, D)`` the hidden states entering the layer.
        cos, sin: ``(B|1, L, d)`` the layer's rotary tables.
        valid: ``(B, L)`` False on padding.
        attention: ``(B, L, L)`` the model's head-averaged attention probabilities.
        cached_keys: ``(B, Hkv, L, d)`` the keys the model cached (after k_norm and RoPE).
        spans: the images' spans, one per sample.
    """

    parts: AttentionParts
    q: torch.Tensor
    k: torch.Tensor
    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    valid: torch.Tensor
    attention: torch.Tensor
    cached_keys: torch.Tensor
    spans: list[ImageSpan]
    text_queries_only: bool = False

    def visual_slots(self, b: int) -> torch.Tensor:
        """``(V,)`` sample ``b``'s visual-token slots."""
        span = next(s for s in self.spans if s.sample == b)
        return span.start + span.visual_positions()

    def query_slots(self, b: int) -> torch.Tensor:
        """``(n,)`` the slots whose rows are compared: every 7th visual token and the last (real) token."""
        last = torch.tensor([self.valid.shape[1] - 1])
        if self.text_queries_only:
            return last
        return torch.cat([self.visual_slots(b)[::7], last])


_RUNS: dict[str, StockRun] = {}


def _stock_run(name: str) -> StockRun:
    """The stock eager model on the two prompts (cached per architecture), read at :data:`LAYER`."""
    if name in _RUNS:
        return _RUNS[name]
    model, proc = tiny(name, "eager")
    adapter = get_adapter(model)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    valid = inputs["attention_mask"].bool()  # (B, L)
    assert (~valid).any(dim=1).tolist() == [True, False], "the shorter prompt must be left-padded"
    seen: dict = {}
    grab = adapter.decoder_layers()[LAYER].register_forward_pre_hook(
        lambda m, a, k: seen.update(k, hidden=a[0] if a else k["hidden_states"]), with_kwargs=True)
    capture = QKCapture(adapter.attention_parts(LAYER))
    capture.attach()
    capture.arm()
    try:
        out = model(**inputs, output_attentions=True, use_cache=True)
    finally:
        grab.remove()
        q, k = capture.take(valid.shape[1])  # (B, L, H*d), (B, L, Hkv*d)
        capture.detach()
    cos, sin = seen["position_embeddings"]  # (B|1, L, d) each
    _RUNS[name] = StockRun(capture.parts, q, k, seen["hidden"], cos, sin, valid,
                           out.attentions[LAYER].float().mean(dim=1),  # (B, L, L) head-averaged
                           generated_cache(out).layers[LAYER].keys,  # (B, Hkv, L, d)
                           adapter.image_spans(inputs))
    return _RUNS[name]


def _rows(run: StockRun, parts: AttentionParts | None = None) -> list[torch.Tensor]:
    """Per sample, ``(n, L)`` crop's rows for :meth:`StockRun.query_slots` from the captured projections."""
    queries = [run.query_slots(b) for b in range(run.valid.shape[0])]
    return attention_rows(parts or run.parts, run.q, run.k, run.cos, run.sin, queries, run.valid)


def _max_diff(run: StockRun, rows: list[torch.Tensor]) -> float:
    """Largest absolute difference between crop's rows and the model's over both samples."""
    return max((rows[b] - run.attention[b, run.query_slots(b)]).abs().max().item() for b in range(len(rows)))


def _top_visual(run: StockRun, b: int, row: torch.Tensor) -> list[int]:
    """The :data:`TOP` visual slots of sample ``b`` that ``row`` (``(L,)``) attends to most, best first."""
    visual = run.visual_slots(b)  # (V,)
    return visual[row[visual].topk(TOP).indices].tolist()


@pytest.mark.parametrize("name", ARCHS)
def test_recomputed_rows_equal_the_models_attention(name):
    """Rows from the captured projections, and from the layer's input, equal eager ``output_attentions``."""
    run = _stock_run(name)
    if name in BIDIRECTIONAL_IMAGES:  # an image token's row also sees its image's later tokens; the rows are for text
        run = dataclasses.replace(run, text_queries_only=True)
    captured = _rows(run)
    assert _max_diff(run, captured) <= 1e-5
    normed = run.parts.norm(run.hidden)  # (B, L, D)
    queries = [run.query_slots(b) for b in range(run.valid.shape[0])]
    recomputed = attention_rows(run.parts, run.parts.q_proj(normed), run.parts.k_proj(normed), run.cos, run.sin,
                                queries, run.valid)  # PyramidDrop's path
    assert _max_diff(run, recomputed) <= 1e-5
    for b, rows in enumerate(captured):
        real = run.valid[b]
        assert not rows[:, ~real].any()  # padding never attended to
        torch.testing.assert_close(rows.sum(dim=-1), torch.ones(rows.shape[0]))


def test_top_visual_tokens_match_the_model_on_qwen3_vl():
    run = _stock_run(QWEN3)
    assert run.parts.q_norm is not None and run.parts.k_norm is not None
    for b, rows in enumerate(_rows(run)):
        assert _top_visual(run, b, rows[-1]) == _top_visual(run, b, run.attention[b, -1])


def test_without_the_qk_norms_qwen3_vl_rows_are_wrong():
    """Dropping Qwen3-VL's q/k norms (what crop did before) changes the rows and the top visual tokens."""
    run = _stock_run(QWEN3)
    bare = dataclasses.replace(run.parts, q_norm=None, k_norm=None)
    rows = _rows(run, bare)
    assert _max_diff(run, rows) > 1e-2
    assert any(set(_top_visual(run, b, r[-1])) != set(_top_visual(run, b, run.attention[b, -1]))
               for b, r in enumerate(rows))


@pytest.mark.parametrize("name", [n for n in ARCHS if "qwen" in n])
def test_dart_ranks_the_keys_the_model_caches(name):
    """DART's pivot scores (L1 of layer K-1's keys after RoPE) are those of the keys the model caches.

    On M-RoPE models DART rotates with the layer's own tables, so its keys are exactly the cached
    ones; on Qwen3-VL that needs the layer's k_norm.
    """
    run = _stock_run(name)
    model, _ = tiny(name, "eager")
    dart = DART(get_adapter(model), DARTConfig(layer=LAYER + 1))
    assert dart.adapter.uses_mrope
    for b in range(run.valid.shape[0]):
        slots = run.valid[b].nonzero()[:, 0]  # (n,) the real tokens
        cb, sb = run.cos[b if run.cos.shape[0] > 1 else 0], run.sin[b if run.sin.shape[0] > 1 else 0]  # (L, d)
        ours = dart._key_l1(run.k[b], cb, sb, slots)  # (n,)
        cached = run.cached_keys[b][:, slots].float().abs().sum(dim=(0, 2))  # (n,) over heads and dims
        torch.testing.assert_close(ours, cached, atol=1e-4, rtol=1e-5)
