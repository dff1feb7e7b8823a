"""Host-device syncs per request: counted, bounded per method, and constant in the number of visual tokens and layers.

A request is ``handle.prepare(inputs, boxes)`` + ``model.generate(...)`` of a few tokens on a
batch of two prompts of different lengths (so one is left-padded). The syncs are counted by
:class:`tests.methods.sync_counter.SyncCounter` (a model of CUDA's rules on the CPU: reading a
device value, a data-sized output, a blocking copy). What a method *adds* is the count of the
request with the method applied minus the same request with ``none`` (the model's and
``generate``'s own syncs cancel out). Each request is counted after one warm-up request on the
same handle, as a served model runs (a lazily loaded compressor is loaded once, not per request).

A sync per visual token turns a GPU prefill into thousands of round trips (SparseVLM made ~1,900
here before its merges and placement were vectorised), so besides the per-method budget each
count must not grow with the image's tokens, the model's depth or the budget.
"""

from __future__ import annotations

import functools

import pytest
import torch

from crop.api import apply_method
from crop.methods import build_config, method_names
from crop.models import get_adapter
from crop.models.tiny import LlavaShape, QwenShape, build_tiny_llava, build_tiny_qwen
from crop.regions import GridBox
from tests.conftest import chat_inputs, greedy, method_config, random_image, tiny
from tests.methods.sync_counter import SyncCounter

METHODS = [m for m in method_names() if m != "none" and not m.startswith("test-")]
QUESTIONS = ["What color is the star?", "How many circles are there in this picture, counting all of them?"]
BOXES = [GridBox(1, 1, 4, 5), GridBox(3, 0, 7, 3)]
STEPS = 3

# Syncs a method adds to one request of two images (3 new tokens), over the unpruned model's, on the tiny LLaVA
# (576 visual tokens per image) and the tiny Qwen2-VL. Most of an inner-LLM method's count is the shared selector's
# bookkeeping in methods/base.py: per image and stage 4 (the image's slots: isin + nonzero + a host->device copy of
# its positions; the kept span indices read back for the stats) and per sample and stage 1 (the kept slots).
BUDGET = {
    "crop-ilp": 4,  # the region known up front: per sample, the kept positions (a mask, its nonzero)
    "crop-plc": 12,  # per image: the region's tokens and the pooled cells (boolean masks, nonzero), the prompt rebuilt
    "crop-plc-trained": 20,  # per image: the region's anchors and queries, the prompt rebuilt
    "crop-region": 8,  # per image: the region's tokens, the prompt rebuilt (LLaVA 8, Qwen2-VL 7)
    "crop-self": 16,  # one stage: the shared selector (2 images: 10), the attention box read back per image
    "cdpruner": 10,  # per batch: visual positions over, prompt rows back, instructions over, kept positions back;
    #                  per image the prompt rebuilt; LLaVA's CLIP text tower reads 2 values itself (LLaVA 10, Qwen2-VL
    #                  7); the DPP's steps read nothing back
    "dart": 34,  # one stage: the shared selector (10), per image its text (nonzero) and pivots' visiting order
    #              (tolist), and duplication_select's per-pivot count of tokens left (8 pivots x 2 images = 16)
    "divprune": 8,  # per image: its visual positions copied over, its kept positions read back (twice), the prompt
    #                rebuilt (LLaVA 8, Qwen2-VL 7); the greedy steps themselves read nothing back
    "fastv": 14,  # one stage: the shared selector (10), per image its top-k moved to the host
    "holov": 10,  # per image: its visual positions copied over and its kept positions read back (LLaVA 4); on
    #              Qwen2-VL the adapter's saliency capture and prompt rebuild add 5 (9 on transformers 5.25, 10 on
    #              5.20); the crops' scores, shares and top-k are batched tensor ops that read nothing back
    "pdrop": 42,  # three stages: the shared selector (30), per image and stage its top-k moved to the host
    "pool": 10,  # per image: the pooled grid and the prompt rebuilt
    "random": 12,  # per image: the drawn positions and the prompt rebuilt
    "random-inner": 8,  # per image: the drawn positions; per sample the kept positions
    "sparsevlm": 49,  # three stages: the shared selector (36); per image and stage its raters' slots (6), per sample and
    #                   stage the raters' union (6), per stage the largest cluster (3); once per image its text (2)
    #                   and visual positions (2). Was ~1,900 (a host read per kept token and per merged token).
    "visionzip": 16,  # per image: dominant and contextual tokens chosen on the vision side, the prompt rebuilt
    #                   (LLaVA 12; Qwen2-VL 15, 16 with transformers 5.20, whose Qwen vision tower reads one more
    #                   value back: its merged-patch layout is rebuilt too)
}
# how far a count may move between sizes, depths and budgets: a stage that keeps all of an image's candidates skips
# that image's selection (one read fewer per image; PyramidDrop on Qwen2-VL's ~140-token images), never more. A sync
# per token or per merged token would move it by hundreds between 140 and 560 tokens.
SLACK = 2


def test_every_method_has_a_budget():
    assert set(BUDGET) == set(METHODS)


# -- the counter itself ------------------------------------------------------------------------------


def test_the_counter_counts_what_waits_on_a_device_and_nothing_born_on_the_host():
    on_device = torch.arange(10.0)  # born outside the counter: device-resident, like inputs and weights
    with SyncCounter() as counter:
        device = on_device.device
        on_host = torch.arange(5)  # no device given: the host
        moved = on_host.to(device)  # 1: a blocking host->device copy
        torch.zeros(3, device=device)  # a device factory: free
        top = on_device.topk(3).indices  # free
        (on_device > 3).nonzero()  # 2: data-sized
        on_device[on_device > 5]  # 3: boolean mask
        on_device.sum().item()  # 4
        top.tolist()  # 5
        host_copy = top.cpu()  # 6
        host_copy.tolist()  # free: already on the host
        on_device[on_host]  # 7: a host index into a device op is copied over
        if (on_device > 3).any():  # 8
            pass
        torch.where(on_device > 1)  # 9: one-argument where is nonzero
        torch.where(on_device > 1, on_device, 0.0)  # free
        (torch.arange(4) + 1).tolist()  # free: host only
        on_device[[1, 2]]  # 10: a Python list index becomes a host tensor, copied
        torch.isin(torch.arange(600, device=device), torch.arange(576, device=device))  # 11: sorting path, _unique
        torch.isin(torch.arange(600, device=device), torch.arange(3, device=device))  # free: broadcast path
        on_device.unique()  # 12
        moved + 1  # free
    assert counter.count == 12, counter.report()
    assert moved is not on_host  # the no-op move handed back an alias, so the source stayed on the host


# -- requests ----------------------------------------------------------------------------------------


@functools.cache
def _model(kind: str, variant: str = "base"):
    """A tiny model by kind ("llava" / "qwen") and variant ("base", "fewer-tokens", "more-tokens", "deeper")."""
    if variant == "base":
        return tiny("tiny-random-llava" if kind == "llava" else "tiny-random-qwen2-vl")
    if kind == "llava":
        llava = {"fewer-tokens": LlavaShape(image_size=168), "deeper": LlavaShape(text_layers=8)}[variant]
        return build_tiny_llava(seed=0, shape=llava)
    qwen = {"more-tokens": QwenShape(max_pixels=672 * 672), "deeper": QwenShape(text_layers=8)}[variant]
    return build_tiny_qwen("qwen2_vl", seed=0, shape=qwen)


IMAGE_SIZES = {"base": [(400, 300), (336, 500)], "more-tokens": [(800, 600), (672, 1000)]}


def _added_syncs(method: str, kind: str, variant: str = "base", share: float = 0.3) -> tuple[int, SyncCounter, SyncCounter]:
    """``(added, method_counter, none_counter)`` for one request (see the module docstring)."""
    model, proc = _model(kind, variant)
    pics = [random_image(41 + i, size) for i, size in enumerate(IMAGE_SIZES.get(variant, IMAGE_SIZES["base"]))]
    inputs = chat_inputs(proc, pics, QUESTIONS)
    assert inputs["attention_mask"].sum(1).tolist()[0] < inputs["input_ids"].shape[1]  # really left-padded
    visual = min(s.visual_tokens for s in get_adapter(model).image_spans(inputs))
    config = build_config("none", None) if method == "none" else \
        method_config(method, max(1, int(share * visual)), model)

    with apply_method(model, config) as handle:
        greedy(model, handle.prepare(inputs, BOXES), steps=STEPS)  # warm-up
        with SyncCounter() as counter:
            greedy(model, handle.prepare(inputs, BOXES), steps=STEPS)
    if method == "none":
        return 0, counter, counter
    _, _, base = _none(kind, variant)
    return counter.count - base.count, counter, base


@functools.cache
def _none(kind: str, variant: str) -> tuple[int, SyncCounter, SyncCounter]:
    return _added_syncs("none", kind, variant)


def _explain(counter: SyncCounter, base: SyncCounter) -> str:
    extra = counter.sites - base.sites
    return "\n".join(f"{n:6d}  {reason} @ {where}" for (reason, where), n in extra.most_common(15))


@pytest.mark.parametrize("kind", ["llava", "qwen"])
@pytest.mark.parametrize("method", METHODS)
def test_a_request_adds_at_most_the_methods_budget(method, kind):
    added, counter, base = _added_syncs(method, kind)
    print(f"{method} on {kind}: {added} syncs added")
    assert added <= BUDGET[method], f"{method} adds {added} syncs (budget {BUDGET[method]}):\n{_explain(counter, base)}"


@pytest.mark.parametrize("method", METHODS)
def test_the_count_does_not_grow_with_tokens_layers_or_budget(method):
    reference = {"llava": _added_syncs(method, "llava")[0], "qwen": _added_syncs(method, "qwen")[0]}
    variants = {  # (kind, what changes): syncs added
        ("llava", "144 instead of 576 visual tokens per image"): _added_syncs(method, "llava", "fewer-tokens")[0],
        ("llava", "8 layers instead of 4"): _added_syncs(method, "llava", "deeper")[0],
        ("llava", "a 60 % budget instead of 30 %"): _added_syncs(method, "llava", share=0.6)[0],
        ("qwen", "~560 instead of ~140 visual tokens per image"): _added_syncs(method, "qwen", "more-tokens")[0],
        ("qwen", "8 layers instead of 4"): _added_syncs(method, "qwen", "deeper")[0],
    }
    print(f"{method}: {reference}, {variants}")
    for (kind, what), count in variants.items():
        assert abs(count - reference[kind]) <= SLACK, \
            f"{method} on {kind}: {count} syncs with {what}, {reference[kind]} before"
