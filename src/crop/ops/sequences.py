"""Rewriting tokenized prompts when the number of visual tokens changes (pre-LLM compression)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def find_runs(row: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """Maximal runs of ``token_id`` in a 1-D id tensor.

    Returns:
        ``[(start, length), ...]`` in order.
    """
    is_tok = (row == token_id).to(torch.int8)  # (L,)
    edges = torch.diff(is_tok, prepend=is_tok.new_zeros(1), append=is_tok.new_zeros(1))  # (L+1,)
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    ends = (edges == -1).nonzero().squeeze(1).tolist()
    return [(s, e - s) for s, e in zip(starts, ends, strict=True)]


def resize_runs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                runs: Sequence[Sequence[tuple[int, int]]], new_lengths: Sequence[Sequence[int]],
                token_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """Replace each placeholder run by a run of a new length, then left-pad the batch again.

    Args:
        input_ids: ``(B, L)`` prompt ids.
        attention_mask: ``(B, L)`` or ``None`` (all ones).
        runs: per sample, the ``(start, length)`` of its placeholder runs.
        new_lengths: per sample, the new length of each run.
        token_id: the placeholder id written into the new runs.
        pad_id: id used for left padding.

    Returns:
        ``(ids, mask, source, starts)``: ``ids``/``mask`` are ``(B, L')``; ``source`` is ``(B, L')``
        the old position each new position copies (``-1`` inside new runs and padding);
        ``starts`` per sample the new start of each run.
    """
    batch, device = input_ids.shape[0], input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows, masks, sources, all_starts = [], [], [], []
    for b in range(batch):
        pieces_src: list[torch.Tensor] = []
        starts: list[int] = []
        cursor, length = 0, 0
        for (start, old_len), new_len in zip(runs[b], new_lengths[b], strict=True):
            pieces_src.append(torch.arange(cursor, start, device=device))
            length += start - cursor
            starts.append(length)
            pieces_src.append(torch.full((new_len,), -1, dtype=torch.long, device=device))
            length += new_len
            cursor = start + old_len
        pieces_src.append(torch.arange(cursor, input_ids.shape[1], device=device))
        src = torch.cat(pieces_src)  # (L_b,)
        ids = torch.where(src >= 0, input_ids[b, src.clamp(min=0)], torch.full_like(src, token_id))
        mask = torch.where(src >= 0, attention_mask[b, src.clamp(min=0)], torch.ones_like(src))
        rows.append(ids)
        masks.append(mask)
        sources.append(src)
        all_starts.append(starts)
    width = max(r.numel() for r in rows)
    out_ids = input_ids.new_full((batch, width), pad_id)
    out_mask = attention_mask.new_zeros((batch, width))
    out_src = torch.full((batch, width), -1, dtype=torch.long, device=device)
    for b in range(batch):
        pad = width - rows[b].numel()
        out_ids[b, pad:] = rows[b]
        out_mask[b, pad:] = masks[b]
        out_src[b, pad:] = sources[b]
        all_starts[b] = [s + pad for s in all_starts[b]]
    return out_ids, out_mask, out_src, all_starts
