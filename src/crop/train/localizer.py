"""Recipe: the embedded localizer, a Qwen2-VL-architecture VLM that emits the 8x8 grid box.

The CROP paper's localizer recipe at toy scale: a real ``Qwen2VLForConditionalGeneration``
(built by :mod:`crop.models.tiny`) is trained from scratch to answer
``localizer_prompt(question, 8)`` with ``format_box(box_grid)`` followed by ``<|im_end|>``.
Its processor resizes every image to 224x224 (``min_pixels = max_pixels = 224 * 224``), so the
vision tower sees 16x16 patches of 14 px and the LLM 8x8 merged tokens: exactly one token per
cell of the region grid. (A cheaper geometry, 8x8 patches of 28 px with no merging,
``QwenShape(patch_size=28, merge_size=1)``, with 2 vision and 3 text layers of width 64,
localized clearly worse in a 75-minute run: mean IoU 0.706, ground truth inside 70.5%, shapes
being the weak point.) Global questions are trained to answer the full box ``[0, 0, 7, 7]``.

The prompt is text-first (:data:`IMAGE_FIRST` is False): the question precedes the image, so
in the causal LLM every image token can read the question and decide whether it belongs to the
asked-about region; the box is then a read-out over the flagged tokens. (Image-first, the
answer position alone must match the question against all 64 tokens; two from-scratch runs of
that layout stayed on a constant-box plateau.) The tokenizer is Qwen2's byte-level BPE plus one
token per benchmark word, which makes the prompt about 60 tokens instead of about 190, plus two
tokens per grid box, its top-left ``"[x0, y0,"`` and bottom-right ``" x1, y1]"`` corner
(``QwenShape.tokenizer = "words+corners"``): the box decodes in two steps instead of twelve,
and ``VLMLocalizer`` stops at the ``"]"``, so the whole localization is one prefill and one
decode step.

Auxiliary losses (training only, not exported): probes on the merged visual tokens predict the
shape/colour of the object in each cell; probes on the image-token hidden states after the
LLM's second layer predict each token's row, column, and whether it lies in the question's
region. Qwen2-VL's vision tower has no absolute position embedding (2-D RoPE only) and the LLM
sees positions only through M-RoPE, so a from-scratch model must first learn where its image
tokens are before it can write a coordinate; the position probes teach that directly.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crop.data.synth import FAMILIES
from crop.localizers.prompt import format_box, localizer_messages
from crop.timing import clock
from crop.train.attention_supervision import (
    AttentionCapture,
    attention_loss,
    image_positions,
    use_capture_attention,
)
from crop.train.config import TrainConfig
from crop.train.data import stream_sample
from crop.train.model_hooks import Capture, llm_layer, llm_layer_index, transformers_model
from crop.train.probes import (
    make_aux_heads,
    question_probe_loss,
    question_targets,
    token_labels,
    token_probe_loss,
)

logger = logging.getLogger(__name__)

IGNORE = -100
GRID = 8
LOCALIZER_IMAGE_SIZE = 224
LOCALIZER_SHAPE = dict(
    vision_hidden=64, vision_layers=3, vision_heads=4, text_hidden=96, text_layers=4, text_heads=4,
    text_kv_heads=2, text_intermediate=192, min_pixels=LOCALIZER_IMAGE_SIZE ** 2, max_pixels=LOCALIZER_IMAGE_SIZE ** 2,
    tokenizer="words+corners",
)
IMAGE_FIRST = False  # text-first prompt: the causal LLM lets each image token read the question


def localizer_chat(processor, question: str) -> str:
    """The chat-template prompt the localizer is trained and served with (as in ``VLMLocalizer``)."""
    return processor.apply_chat_template(localizer_messages(question, GRID, IMAGE_FIRST), add_generation_prompt=True)


class LocalizerTask:
    """The localizer recipe for :func:`crop.train.loop.train`.

    Args:
        config: the run's config; ``config.shape`` overrides :data:`LOCALIZER_SHAPE`.
    """

    kind = "localizer"
    architecture = "qwen2_vl"

    def __init__(self, config: TrainConfig):
        from crop.models.tiny import QwenShape, qwen_processor

        self.shape = QwenShape(**{**LOCALIZER_SHAPE, **config.shape})
        self.config = config
        self.processor = qwen_processor("qwen2_vl", self.shape)
        tok = self.processor.tokenizer
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id
        self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.pos_layer = min(config.question_layer, self.shape.text_layers - 1)

    def build(self, config: TrainConfig):
        """A fresh seeded model and its processor."""
        from crop.embedded import build_from_shape

        torch.manual_seed(config.seed)
        model, processor = build_from_shape(self.architecture, asdict(self.shape))
        if config.attn_weight > 0:
            use_capture_attention(model)  # SDPA that also keeps the supervised head's probabilities
        return model, processor

    def aux_heads(self, model: nn.Module) -> nn.ModuleDict:
        """Content probes on merged visual tokens; row/column probes on LLM image tokens."""
        dim = transformers_model(model).config.text_config.hidden_size
        heads = make_aux_heads(dim, {"row": GRID, "col": GRID, "region": 2})
        return heads

    def collate(self, items: list[tuple[str, int]]) -> dict:
        """Generate the samples and build inputs, box-only labels and token labels.

        Returns:
            ``input_ids``/``attention_mask``/``mm_token_type_ids``/``labels`` (B, L)
            right-padded, ``pixel_values`` (B * 256, 1176), ``image_grid_thw`` (B, 3),
            ``aux`` (B, 3, 64) token labels, ``families``, ``boxes`` (B, 4).
        """
        cfg = self.config
        samples = [stream_sample(s, i, cfg.data_seed, cfg.eval_seed) for s, i in items]
        tok = self.processor.tokenizer
        seqs, labels, types, pixels, thw, probe_pos, probe_targets, attn_targets = [], [], [], [], [], [], [], []
        for b, s in enumerate(samples):
            enc = self.processor(images=[s.image], text=[localizer_chat(self.processor, s.question)], return_tensors="pt")
            p = enc["input_ids"][0].tolist()
            a = tok(format_box(s.box_grid), add_special_tokens=False)["input_ids"] + [self.eos_id]
            seqs.append(p + a)
            labels.append([IGNORE] * len(p) + a)
            probe_pos.append((b, len(p)))  # the "[" token, where x0 is predicted
            probe_targets.append(question_targets(s.question, s.family))
            box = np.zeros((GRID, GRID), dtype=np.float32)  # one merged token per grid cell
            x0, y0, x1, y1 = s.box_grid
            box[y0:y1 + 1, x0:x1 + 1] = 1.0
            attn_targets.append((box / box.sum()).reshape(-1))
            types.append(enc["mm_token_type_ids"][0].tolist() + [0] * len(a))
            pixels.append(enc["pixel_values"])
            thw.append(enc["image_grid_thw"])
        length = max(len(x) for x in seqs)
        bsz = len(seqs)
        input_ids = torch.full((bsz, length), self.pad_id, dtype=torch.long)  # (B, L)
        label_t = torch.full((bsz, length), IGNORE, dtype=torch.long)  # (B, L)
        type_t = torch.zeros((bsz, length), dtype=torch.long)  # (B, L)
        mask = torch.zeros((bsz, length), dtype=torch.long)  # (B, L)
        for b, (x, y, t) in enumerate(zip(seqs, labels, types, strict=True)):
            input_ids[b, : len(x)] = torch.tensor(x)
            label_t[b, : len(y)] = torch.tensor(y)
            type_t[b, : len(t)] = torch.tensor(t)
            mask[b, : len(x)] = 1
        aux = torch.from_numpy(np.stack([token_labels(s.objects, s.image.size[0], GRID, GRID) for s in samples]))
        return {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": type_t, "labels": label_t,
                "pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(thw), "aux": aux,
                "families": [s.family for s in samples], "boxes": torch.tensor([s.box_grid for s in samples]),
                "probe_pos": torch.tensor(probe_pos), "probe_targets": torch.tensor(probe_targets),
                "attn_targets": torch.from_numpy(np.stack(attn_targets))}

    def _forward(self, model: nn.Module, batch: dict, capture: bool):
        caps = {}
        if capture:
            caps["vis"] = Capture(transformers_model(model).model.visual.merger)
            caps["pos"] = Capture(llm_layer(model, self.pos_layer))
        try:
            layer = llm_layer_index(model, self.config.attn_layer)
            with AttentionCapture(layer if capture and self.config.attn_weight > 0 else None,
                                  batch.get("probe_pos")) as att:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            mm_token_type_ids=batch["mm_token_type_ids"], pixel_values=batch["pixel_values"],
                            image_grid_thw=batch["image_grid_thw"])
            feats = {k: c.pop() for k, c in caps.items()}
            if att.probs is not None:
                feats["attn"] = att.probs  # (Q, L)
        finally:
            for c in caps.values():
                c.remove()
        return out.logits, feats  # (B, L, V)

    def loss(self, model: nn.Module, heads: nn.ModuleDict, batch: dict, aux_weight: float):
        """Box-token cross-entropy plus ``aux_weight`` x the probe losses."""
        logits, feats = self._forward(model, batch, capture=aux_weight > 0)
        labels = batch["labels"][:, 1:]  # (B, L-1)
        ans = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
        logs = {"ans": float(ans.detach())}
        total = ans
        if aux_weight > 0:
            bsz = batch["aux"].shape[0]
            vis = feats["vis"].reshape(bsz, GRID * GRID, -1)  # (B, 64, D)
            aux = token_probe_loss(heads, ("shape", "color"), vis, batch["aux"][:, :2])
            hidden = feats["pos"]  # (B, L, D)
            img = hidden[batch["input_ids"] == self.image_token_id].reshape(bsz, GRID * GRID, -1)  # (B, 64, D)
            cells = torch.arange(GRID * GRID)
            rows = (cells // GRID).repeat(bsz)  # (B * 64,)
            cols = (cells % GRID).repeat(bsz)
            aux = aux + F.cross_entropy(heads["row"](img).flatten(0, 1), rows) \
                + F.cross_entropy(heads["col"](img).flatten(0, 1), cols)
            pos = batch["probe_pos"]  # (B, 2)
            qloss = question_probe_loss(heads, hidden[pos[:, 0], pos[:, 1]], batch["probe_targets"])
            if not IMAGE_FIRST and "region" in heads:
                # text-first, each image token can read the question: teach it to (1) know what is
                # asked (the question probes, on every image token) and (2) whether it is in the
                # asked-about region (class-balanced: a region is a few of 64 cells)
                inside = (batch["attn_targets"] > 0).long()[:, None]  # (B, 1, 64)
                region = token_probe_loss(heads, ("region",), img, inside)
                logs["region"] = float(region.detach())
                aux = aux + region
                qloss = qloss + question_probe_loss(heads, img.flatten(0, 1),
                                                    batch["probe_targets"].repeat_interleave(GRID * GRID, 0))
            logs["aux"] = float(aux.detach())
            logs["qaux"] = float(qloss.detach())
            total = total + aux_weight * (aux + qloss)
            if "attn" in feats:
                img_pos = image_positions(batch["input_ids"], self.image_token_id, GRID * GRID)  # (B, 64)
                att = attention_loss(feats["attn"], pos[:, 0], img_pos, batch["attn_targets"])
                logs["att"] = float(att.detach())
                total = total + self.config.attn_weight * att
        logs["loss"] = float(total.detach())
        return total, logs

    def quick_val(self, model: nn.Module, batch: dict) -> dict:
        """Teacher-forced exact box match, per family."""
        logits, _ = self._forward(model, batch, capture=False)
        labels = batch["labels"][:, 1:]
        pred = logits[:, :-1].argmax(-1)  # (B, L-1)
        ok = ((pred == labels) | (labels == IGNORE)).all(1)  # (B,)
        out = {"exact": float(ok.float().mean())}
        for fam in FAMILIES:
            idx = [i for i, f in enumerate(batch["families"]) if f == fam]
            if idx:
                out[fam] = float(ok[idx].float().mean())
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, processor: Any, config: TrainConfig) -> dict:
        """IoU / containment of greedy boxes on ``config.eval_n`` held-out samples."""
        return evaluate_localizer(model, processor, config.eval_split, config.eval_n, config.eval_seed)

    def export(self, model: nn.Module, processor: Any, out_dir: Path, summary: dict) -> None:
        """Save the weights, configs and model card into ``out_dir``."""
        from crop.embedded import save_embedded
        from crop.train.cards import localizer_card

        meta = {"kind": self.kind, "prompt": "crop.localizers.prompt.localizer_prompt(question, 8)", "grid": GRID,
                "image_first": IMAGE_FIRST,
                "image_size": LOCALIZER_IMAGE_SIZE, "training": {k: v for k, v in summary.items() if k != "history"}}
        save_embedded(model, self.architecture, asdict(self.shape), out_dir, meta, localizer_card(summary, asdict(self.shape)))


@torch.no_grad()
def evaluate_localizer(model: nn.Module, processor: Any, split: str = "test", n: int = 800, seed: int = 0,
                       batch_size: int = 16) -> dict:
    """Localization quality on ``n`` benchmark samples, through the serving code path.

    Boxes are decoded by :class:`crop.localizers.vlm.VLMLocalizer` (greedy, left-padded
    batches, unparsable output -> full image).

    Args:
        model: a Qwen2-VL-style localizer.
        processor: its processor.
        split: benchmark split.
        n: number of samples.
        seed: benchmark seed.
        batch_size: images per ``generate`` call.

    Returns:
        Mean IoU with the ground-truth grid box, share of samples whose ground-truth box lies
        inside the predicted one, exact-match rate, fallback rate, all overall and per family.
    """
    from crop.data.synth import generate
    from crop.localizers.vlm import VLMLocalizer
    from crop.regions import GridBox

    model.eval()
    localizer = VLMLocalizer(model, processor, grid=GRID, batch_size=batch_size, image_first=IMAGE_FIRST)
    samples = list(generate(n, seed, split))
    stats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    examples: list[dict] = []
    for start in range(0, n, batch_size):
        chunk = samples[start:start + batch_size]
        results = localizer.localize([s.image for s in chunk], [s.question for s in chunk])
        for s, r in zip(chunk, results, strict=True):
            x0, y0, x1, y1 = s.box_grid
            gt = GridBox(x0, y0, x1, y1, grid=GRID)
            for key in (s.family, "all"):
                stats[key]["iou"].append(r.box.iou(gt))
                stats[key]["contains"].append(float(r.box.contains(gt)))
                stats[key]["exact"].append(float(r.box == gt))
                stats[key]["fallback"].append(float(r.fallback))
                stats[key]["area"].append(r.box.area / GRID ** 2)
            if len(examples) < 12:
                examples.append({"id": s.id, "question": s.question, "box": s.box_grid, "predicted": r.box.as_list(),
                                 "raw": r.raw})
    def summarize(d):
        return {f"mean_{k}" if k in ("iou", "area") else f"{k}_rate": round(float(np.mean(v)), 4) for k, v in d.items()}
    out = {"split": split, "seed": seed, "n": n, **summarize(stats["all"])}
    out["per_family"] = {f: summarize(stats[f]) for f in FAMILIES if f in stats}
    out["examples"] = examples
    return out


@torch.no_grad()
def measure_cost(localizer: tuple[nn.Module, Any], answerer: tuple[nn.Module, Any], n: int = 20, threads: int = 1,
                 seed: int = 0, batch_size: int = 1) -> dict:
    """Wall time of the localizer (processor + prefill + box decode) vs the answerer's prefill.

    Both run on the same test images, ``batch_size`` at a time, interleaved in this process
    (localizer batch, then answerer batch) with ``threads`` torch threads, so that both see the
    same machine load; each timing is the median over ``n`` batches after one warm-up batch,
    divided by ``batch_size`` (milliseconds per image).

    Args:
        localizer: ``(model, processor)`` of the localizer.
        answerer: ``(model, processor)`` of the answerer.
        n: batches to time.
        threads: torch threads during the measurement.
        seed: benchmark seed of the test images.
        batch_size: images per localizer and answerer call (1 = latency, larger = throughput).

    Returns:
        Per-image medians in milliseconds: ``localizer_ms`` (end to end through
        ``VLMLocalizer``), ``localizer_generate_ms`` (its prefill + box decode only),
        ``answerer_prefill_ms`` (one forward over all visual tokens, preprocessing excluded),
        ``answerer_preprocess_ms``; the ratios ``ratio_to_answerer_prefill`` (localizer end to
        end / answerer prefill: the strictest), ``ratio_generate_to_answerer_prefill``
        (prefill + decode / prefill: preprocessing on neither side) and
        ``ratio_to_answerer_preprocess_and_prefill`` (end to end on both sides); and an analytic
        FLOPs estimate of both (``flops_ratio``).
    """
    from crop.data.synth import generate
    from crop.eval.flops import DecoderDims, llava_vision_flops, localization_flops, prefill_flops
    from crop.localizers.vlm import VLMLocalizer
    from crop.train.answerer import answerer_prompt

    if batch_size < 1 or n < 1:
        raise ValueError(f"batch_size and n must be >= 1, got {batch_size} and {n}")
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (lm, lp), (am, ap) = localizer, answerer
        am = transformers_model(am)  # its config sizes the FLOPs estimate
        lm.eval()
        am.eval()
        loc = VLMLocalizer(lm, lp, grid=GRID, batch_size=batch_size, image_first=IMAGE_FIRST)
        samples = list(generate((n + 1) * batch_size, seed, "test"))
        batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
        t_loc, t_gen, t_pre, t_fwd, new_tokens = [], [], [], [], []
        for i, batch in enumerate(batches):
            images, questions = [s.image for s in batch], [s.question for s in batch]
            t0 = clock()
            loc.localize(images, questions)
            t1 = clock()
            inputs = loc.prepare(images, questions)
            t2 = clock()
            new = loc.generate(inputs)  # (B, T)
            t3 = clock()
            a_in = ap(images=images, text=[answerer_prompt(ap, q) for q in questions], padding=True,
                      return_tensors="pt")
            t4 = clock()
            am(**a_in)
            t5 = clock()
            if i == 0:
                continue  # warm-up
            t_loc.append(t1 - t0)
            t_gen.append(t3 - t2)
            t_pre.append(t4 - t3)
            t_fwd.append(t5 - t4)
            new_tokens.append(new.shape[1])
        med = lambda v: float(np.median(v)) * 1000 / batch_size  # noqa: E731  (ms per image)
        n_new = float(np.mean(new_tokens))
        pixels = inputs["pixel_values"]  # (B * patches, values per patch)
        loc_flops = localization_flops(lm.config, int(inputs["input_ids"].shape[1]), int(pixels.shape[0]) // batch_size,
                                       int(pixels.shape[1]), int(round(n_new)))
        visual = int((a_in["input_ids"][0] == am.config.image_token_id).sum())
        dims = DecoderDims.from_config(am.config.get_text_config())
        ans_flops = llava_vision_flops(am.config, visual) + prefill_flops(
            dims, [int(a_in["input_ids"].shape[1])] * dims.layers)
        loc_ms, gen_ms, fwd_ms, pre_ms = med(t_loc), med(t_gen), med(t_fwd), med(t_pre)
        return {
            "n": n, "threads": threads, "batch_size": batch_size,
            "localizer_ms": round(loc_ms, 2), "localizer_generate_ms": round(gen_ms, 2),
            "localizer_new_tokens": n_new,
            "localizer_input_tokens": int(inputs["input_ids"].shape[1]),
            "answerer_prefill_ms": round(fwd_ms, 2), "answerer_preprocess_ms": round(pre_ms, 2),
            "answerer_input_tokens": int(a_in["input_ids"].shape[1]),
            "ratio_to_answerer_prefill": round(loc_ms / fwd_ms, 3),
            "ratio_generate_to_answerer_prefill": round(gen_ms / fwd_ms, 3),
            "ratio_to_answerer_preprocess_and_prefill": round(loc_ms / (fwd_ms + pre_ms), 3),
            "localizer_gflops": round(loc_flops / 1e9, 4), "answerer_prefill_gflops": round(ans_flops / 1e9, 4),
            "flops_ratio": round(loc_flops / ans_flops, 3),
        }
    finally:
        torch.set_num_threads(prev)
