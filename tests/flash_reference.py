"""FlashAttention-2 on the CPU for tests: transformers' own FA2 glue, with a reference attention as the kernel.

The CUDA kernels of ``flash-attn`` cannot run here, but everything transformers does around them
can: the 2-D padding mask that ``create_causal_mask`` builds for ``flash_attention_2``, the
unpadding into variable-length sequences (``_upad_input``), the choice between the dense, the
variable-length and the packed-sequence paths, and the re-padding of the output. This module
installs two small reference functions with the signatures of ``flash_attn_func`` and
``flash_attn_varlen_func`` (FlashAttention >= 2.1: a causal mask is aligned to the bottom right
when queries and keys differ in length) where transformers' lazy import would put the real ones,
and switches a model instance to ``flash_attention_2`` without the package check. The real kernel
runs in ``pytest -m gpu`` (tests/test_gpu.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import transformers.modeling_flash_attention_utils as fa_utils
from torch import nn

CALLS = {"kernel": 0}  # calls of the reference kernels, so a test can prove FA2 really ran


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
    """Attention of one sequence: ``q (Lq, H, d)``, ``k, v (Lk, Hkv, d)`` -> ``(Lq, H, d)``."""
    CALLS["kernel"] += 1
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # (Lk, H, d) GQA
    v = v.repeat_interleave(heads // kv_heads, dim=1)  # (Lk, H, d)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # (H, Lq, Lk)
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)  # bottom-right aligned (flash-attn >= 2.1)
        scores = scores.masked_fill(torch.arange(lk, device=q.device)[None, :] > rows, float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float())  # (Lq, H, d)
    return out.to(q.dtype)


def reference_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_func``: ``q (B, Lq, H, d)``, ``k, v (B, Lk, Hkv, d)`` -> ``(B, Lq, H, d)``."""
    return torch.stack([_attend(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])])


def reference_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                     block_table=None):
    """``flash_attn_varlen_func``: packed ``q (Tq, H, d)``, ``k, v (Tk, Hkv, d)``, sequences cut at ``cu_seqlens``."""
    out = torch.empty_like(q)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        sq, eq, sk, ek = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        out[sq:eq] = _attend(q[sq:eq], k[sk:ek], v[sk:ek], causal, softmax_scale)
    return out


_KERNELS = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn", "_unpad_fn",
            "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")


def _configs(model: nn.Module):
    config = model.config
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None:
            yield sub


@contextlib.contextmanager
def reference_flash_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model``'s language model with ``flash_attention_2`` and the reference kernels; restore on exit.

    Only the text side switches (the vision towers keep theirs): it is the decoder whose masks and
    positions inner-LLM pruning rewrites.
    """
    saved_kernels = {name: getattr(fa_utils, name) for name in _KERNELS}
    text = model.config.get_text_config()
    saved = text._attn_implementation
    try:
        fa_utils._loaded_implementation = "flash_attention_2"
        fa_utils._flash_fn = reference_flash_attn_func
        fa_utils._flash_varlen_fn = reference_flash_attn_varlen_func
        fa_utils._flash_with_kvcache_fn = None
        fa_utils._pad_fn, fa_utils._unpad_fn = fa_utils._pad_input, fa_utils._unpad_input
        fa_utils._process_flash_kwargs_fn = fa_utils._lazy_define_process_function(reference_flash_attn_varlen_func)
        fa_utils._process_with_kvcache_kwargs_fn = dict
        text._attn_implementation = "flash_attention_2"
        yield model
    finally:
        text._attn_implementation = saved
        for name, value in saved_kernels.items():
            setattr(fa_utils, name, value)
