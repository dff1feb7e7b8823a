"""SparseVLM's batched (device-side) selection, merges and placement against the per-token loop they replaced.

The loop version below is the selection as it was written before it was vectorised (a host
round trip per kept token and per merged token): host-side top-k, ``nonzero`` of the pruned
tokens, one ``nonzero`` per cluster for its members, and the merged tokens moved into place in a
Python list. Both must keep the same tokens, build the same clusters, place them in the same
order and give the same logits, bit for bit, on padded batches of two images, on LLaVA
(renumbered and kept positions), LLaVA-NeXT and Qwen2-VL. The merge means are checked
separately against the per-cluster sums they replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from crop.api import apply_method
from crop.methods import METHODS
from crop.methods.sparsevlm import (
    SparseVLM,
    SparseVLMConfig,
    _Merge,
    _MergeSet,
    density_peak_clusters,
    recycled_counts,
)
from crop.models import get_adapter
from tests.conftest import chat_inputs, greedy, random_image, tiny

IMAGES = [random_image(41, (400, 300)), random_image(42, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there in this picture, counting all of them?"]


@dataclass
class LoopSparseVLMConfig(SparseVLMConfig):
    """SparseVLM, selected through the per-token loop (a test-only method)."""

    method_name: ClassVar[str] = "test-sparsevlm-loop"


class LoopSparseVLM(SparseVLM):
    """SparseVLM with the per-token / per-merge loops it had before (the reference of this file)."""

    name = "test-sparsevlm-loop"
    config_class = LoopSparseVLMConfig

    def _select_image(self, sample, image, slots, scores, keep, hidden, origin):
        n = slots.numel()
        if keep is None or n == 0:
            return torch.arange(n), None
        k = min(keep, n - 1)
        scores = scores.cpu()  # (v,)
        top = scores.topk(k).indices if k > 0 else torch.zeros(0, dtype=torch.long)  # (k,)
        pruned_mask = torch.ones(n, dtype=torch.bool)
        pruned_mask[top] = False
        pruned = pruned_mask.nonzero().squeeze(1)  # (P,) in sequence order
        recycled, clusters = recycled_counts(n, k, self.config.recycle, self.config.cluster_size)
        if clusters == 0:
            return top.sort().values, None
        pool = pruned[scores[pruned].topk(recycled).indices]  # (R,) best-rated pruned, best first
        pool_slots = slots.cpu()[pool]  # (R,)
        centres, assign = density_peak_clusters(hidden[sample, pool_slots.to(hidden.device)], clusters)
        members = []
        for c in range(clusters):
            group = (assign == c).nonzero().squeeze(1)
            members.append(torch.cat([centres[c:c + 1], group[group != centres[c]]]))
        row = origin[sample].cpu()
        new = []
        for group in members:
            group_slots = pool_slots[group.cpu()]  # (g,) centre first
            centre = int(group_slots[0])
            new.append(_Merge(sample, centre, group_slots, int(row[centre]), row[group_slots]))
        merges = _MergeSet.from_merges(new, hidden.device)
        merges.image = [image] * len(new)
        return torch.cat([top.sort().values, pool[torch.stack([g[0].cpu() for g in members])]]), merges

    def _place_merged(self, stage, hidden, keep, merges):
        if merges is None:
            return keep
        merges = merges.to_merges()
        origin = self.slot_origin(stage, hidden)  # (B, L)
        out = []
        for b, row in enumerate(keep):
            order = row.tolist()
            for span in (s for s in self._spans if s.sample == b):
                mine = [m.center for m in merges if m.sample == b and span.start <= m.origin < span.start + span.length]
                if not mine:
                    continue
                moved = set(mine)
                rest = [s for s in order if s not in moved]
                inside = [i for i, s in enumerate(rest) if span.start <= int(origin[b, s]) < span.start + span.length]
                at = inside[-1] + 1 if inside else sum(1 for s in order[:order.index(mine[0])] if s not in moved)
                order = rest[:at] + mine + rest[at:]
            out.append(torch.tensor(order, dtype=torch.long, device=row.device))
        return out


if LoopSparseVLM.name not in METHODS:
    METHODS.register(LoopSparseVLM.name)(LoopSparseVLM)


def _run(model, inputs, config):
    """Kept span indices per stage, merges per stage, each pruner's slot order, and per-step logits."""
    with apply_method(model, config) as h:
        out = greedy(model, h.prepare(inputs), steps=2)
        merges = [[(m.sample, m.center, m.group.tolist(), m.origin, m.group_origin.tolist()) for m in stage]
                  for stage in h.method._merges]
        order = [[k.tolist() for k in p.context.keep] for p in h.method.pruners]
        return h.stats.kept_per_stage, merges, order, out.logits


@pytest.mark.parametrize("name,positions", [("tiny-random-llava", "auto"), ("tiny-random-llava", "keep"),
                                            ("tiny-random-llava-next", "auto"), ("tiny-random-qwen2-vl", "auto")])
@pytest.mark.parametrize("share", [0.3, 0.6])
def test_the_batched_selection_is_the_per_token_loop_bit_for_bit(name, positions, share):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    assert inputs["attention_mask"].sum(1).tolist()[0] < inputs["input_ids"].shape[1]  # left-padded
    keep = int(share * min(s.visual_tokens for s in get_adapter(model).image_spans(inputs)))
    kept, merges, order, logits = _run(model, inputs, SparseVLMConfig(keep_tokens=keep, positions=positions))
    ref_kept, ref_merges, ref_order, ref_logits = _run(model, inputs,
                                                       LoopSparseVLMConfig(keep_tokens=keep, positions=positions))
    assert sum(len(stage) for stage in merges) > 0  # something was merged
    assert kept == ref_kept
    assert merges == ref_merges
    assert order == ref_order
    for step, ref in zip(logits, ref_logits, strict=True):
        assert torch.equal(step, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_merge_means_are_the_per_cluster_sums(dtype):
    """Every merged token's mean, batched and zero-padded, equals its own cluster's sum over ``count + 1e-6``, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    hidden = (torch.randn(2, 400, 64, generator=gen) * 3).to(dtype)  # (B, L, D)
    sizes = [1, 2, 7, 15, 16, 17, 31, 33, 60, 3]  # both sides of the 16-row blocks of the CPU's summation
    merges = []
    for i, size in enumerate(sizes):
        group = torch.randperm(400, generator=gen)[:size]  # (g,) centre first
        merges.append(_Merge(i % 2, int(group[0]), group))
    centres = {(m.sample, m.center) for m in merges}
    assert len(centres) == len(merges)
    expected = [hidden[m.sample, m.group].sum(dim=0) / (m.group.numel() + 1e-6) for m in merges]  # the old loop
    out = hidden.clone()
    _MergeSet.from_merges(merges).apply(out)
    for m, mean in zip(merges, expected, strict=True):
        assert torch.equal(out[m.sample, m.center], mean), m.group.numel()
    untouched = torch.ones(2, 400, dtype=torch.bool)
    for m in merges:
        untouched[m.sample, m.center] = False
    assert torch.equal(out[untouched], hidden[untouched])
