"""Analytic FLOPs and KV-cache sizes of decoder-only transformers, from their configs.

Counted: every matrix multiply (2 FLOPs per multiply-add) of the attention projections, the
MLP (gated, 3 matrices, as Llama/Qwen2) and the attention itself (QK^T and AV, causal: query
``i`` sees ``context_i`` keys). Ignored: norms, activations, softmax, RoPE (a few percent at
most). These numbers predict *ratios* between methods on the same model; they are not a
hardware model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderDims:
    """The sizes that decide a decoder's cost."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, text_config) -> DecoderDims:
        """From a Llama/Qwen2-style text config (``model.config.get_text_config()``)."""
        heads = int(text_config.num_attention_heads)
        hidden = int(text_config.hidden_size)
        head_dim = int(getattr(text_config, "head_dim", None) or hidden // heads)
        return cls(hidden=hidden, intermediate=int(text_config.intermediate_size),
                   layers=int(text_config.num_hidden_layers), heads=heads,
                   kv_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
                   head_dim=head_dim, vocab=int(text_config.vocab_size))

    @property
    def linear_flops_per_token(self) -> int:
        """FLOPs of one token through one layer's projections and MLP."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        return 2 * (q_o + k_v + mlp)

    def attention_flops(self, queries: int, context_before: int) -> int:
        """QK^T + AV FLOPs for ``queries`` new tokens appended causally after ``context_before`` cached ones."""
        # query i (0-based) sees context_before + i + 1 keys
        keys = queries * context_before + queries * (queries + 1) // 2
        return 2 * 2 * self.heads * self.head_dim * keys


def prefill_flops(dims: DecoderDims, tokens_per_layer: Sequence[int], logits: int = 1) -> int:
    """FLOPs of a prefill where layer ``l`` processes ``tokens_per_layer[l]`` tokens (per sample).

    Args:
        dims: the decoder.
        tokens_per_layer: sequence length entering each layer (pruning shortens it).
        logits: positions whose logits are computed (``generate`` computes the last one only).
    """
    if len(tokens_per_layer) != dims.layers:
        raise ValueError(f"need {dims.layers} per-layer token counts, got {len(tokens_per_layer)}")
    total = sum(n * dims.linear_flops_per_token + dims.attention_flops(n, 0) for n in tokens_per_layer)
    return total + 2 * dims.hidden * dims.vocab * logits


def decode_flops(dims: DecoderDims, cache_per_layer: Sequence[int]) -> int:
    """FLOPs of one decode step with ``cache_per_layer[l]`` cached positions in layer ``l``."""
    total = sum(dims.linear_flops_per_token + dims.attention_flops(1, c) for c in cache_per_layer)
    return total + 2 * dims.hidden * dims.vocab


def kv_cache_bytes(dims: DecoderDims, cache_per_layer: Sequence[int], batch: int = 1, bytes_per_value: int = 4) -> int:
    """Bytes of keys + values for the given per-layer cache lengths."""
    return sum(cache_per_layer) * batch * 2 * dims.kv_heads * dims.head_dim * bytes_per_value


def vit_flops(tokens: int, hidden: int, intermediate: int, layers: int, patch_pixels: int,
              gated: bool = False) -> int:
    """FLOPs of a ViT encoder over ``tokens`` patches (patch embedding + ``layers`` blocks, full attention)."""
    embed = 2 * tokens * patch_pixels * hidden
    mlp = (3 if gated else 2) * hidden * intermediate
    per_layer = 2 * tokens * (4 * hidden * hidden + mlp) + 2 * 2 * tokens * tokens * hidden
    return embed + layers * per_layer
