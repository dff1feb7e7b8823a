"""Recipe: the embedded answerer, a LLaVA-architecture VLM trained from scratch on the benchmark.

The model is a real ``LlavaForConditionalGeneration`` (CLIP vision tower with learned absolute
position embeddings, 2-layer GELU projector, Llama LM) built by :mod:`crop.models.tiny` at
336 px with 21 px patches, i.e. a 16x16 = 256-token visual grid (2x2 tokens per cell of the
8x8 region grid), and a 12-layer language model, so that an inner-LLM pruning layer K = 2 is
early (1/6 of the depth; LLaVA-1.5-7B: 2 of 32). The prompt is the standard image-first
LLaVA-1.5 layout, ``"USER: <image>\nq ASSISTANT:"`` (the processor's chat template,
``add_generation_prompt=True``); the target is ``" " + answer`` followed by ``</s>``, and the
language-model loss is taken on the answer tokens only.

This model is the judge of every pruning method, so it is trained with **no signal derived
from the question's region or from any method**: no attention supervision, no
region-membership probes, nothing on the image tokens that depends on the question. What it
does get besides the answer loss is question-independent dense supervision of the visual
features, standing in for a pretrained vision tower: linear probes on the projector's output
predict, for every visual token, the shape, colour and digit of the object covering it (object
and background tokens weighted half each). Optional probes at each answer's first position
predict what the question asks (family, shape, colour, direction words of the question text);
they read the question, never the image's region. The vision tower and projector may be warm
started from an earlier answerer (``init_parts="vision"``): the tower never sees the question.
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

from crop.data.synth import FAMILIES, answers_match, scene_questions
from crop.train.config import TrainConfig
from crop.train.data import stream_sample
from crop.train.model_hooks import Capture, llm_layer, transformers_model
from crop.train.probes import (
    make_aux_heads,
    question_probe_loss,
    question_targets,
    token_labels,
    token_probe_loss,
)

logger = logging.getLogger(__name__)

IGNORE = -100
ANSWERER_SHAPE = dict(
    image_size=336, patch_size=21, vision_hidden=128, vision_layers=4, vision_heads=4,
    text_hidden=128, text_layers=12, text_heads=4, text_kv_heads=2, text_intermediate=256,
)


def answerer_prompt(processor, question: str) -> str:
    """The chat-template prompt the answerer is trained and served with."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


class AnswererTask:
    """The answerer recipe for :func:`crop.train.loop.train`.

    Args:
        config: the run's config; ``config.shape`` overrides :data:`ANSWERER_SHAPE`.
    """

    kind = "answerer"
    architecture = "llava"

    def __init__(self, config: TrainConfig):
        from crop.models.tiny import LlavaShape, llava_processor

        self.shape = LlavaShape(**{**ANSWERER_SHAPE, **config.shape})
        self.config = config
        self.processor = llava_processor(self.shape)
        tok = self.processor.tokenizer
        self.image_token_id = tok.convert_tokens_to_ids("<image>")
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id
        self.grid = self.shape.image_size // self.shape.patch_size
        self.n_image_tokens = self.grid * self.grid

    # -- model --------------------------------------------------------------------------------
    def build(self, config: TrainConfig):
        """A fresh seeded model and its processor."""
        from crop.embedded import build_from_shape

        torch.manual_seed(config.seed)
        if config.attn_weight > 0:
            raise ValueError("the answerer is trained without attention supervision (it judges region pruning); "
                             "use attn_weight=0")
        if self.shape.question_first:
            raise ValueError("the answerer uses the standard image-first LLaVA template; question_first is not "
                             "supported by this recipe")
        return build_from_shape(self.architecture, asdict(self.shape))

    def aux_heads(self, model: nn.Module) -> nn.ModuleDict:
        """Per-token probes on the projector output (text width) and question probes at the answer position."""
        return make_aux_heads(transformers_model(model).config.text_config.hidden_size)

    # -- data ---------------------------------------------------------------------------------
    def _prompt_ids(self, question: str) -> list[int]:
        text = answerer_prompt(self.processor, question)
        text = text.replace("<image>", "<image>" * self.n_image_tokens)  # what the processor does
        return self.processor.tokenizer(text, add_special_tokens=True)["input_ids"]

    def _answer_ids(self, answer: str) -> list[int]:
        return self.processor.tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def _turn_ids(self, question: str) -> list[int]:
        # a later chat turn, as the chat template renders it after an answer: " USER: q ASSISTANT:"
        return self.processor.tokenizer(" USER: " + question + " ASSISTANT:", add_special_tokens=False)["input_ids"]

    def _extra_questions(self, sample, stream: str, index: int) -> list[tuple[str, str, str, list[int]]]:
        if self.config.turns <= 1 or not stream.startswith("train"):
            return []
        others = [q for q in scene_questions(sample.objects, self.shape.image_size) if q[1] != sample.question]
        rng = np.random.default_rng([self.config.data_seed, 7919, index])
        order = rng.permutation(len(others))[: self.config.turns - 1]
        return [others[i] for i in order]

    def collate(self, items: list[tuple[str, int]]) -> dict:
        """Generate the samples and build model inputs, answer-only labels and probe targets.

        Training streams get ``config.turns`` chat turns per image (the benchmark question
        first); val/test streams are single-turn, exactly as served.

        Returns:
            ``input_ids``/``attention_mask``/``labels`` (B, L) right-padded, ``pixel_values``
            (B, 3, S, S), ``aux`` (B, 3, N) visual-token labels, ``probe_pos`` (Q, 2) (row,
            position) of each answer's first token, ``probe_targets`` (Q, 4) question probes,
            ``families`` (first-turn family per row).
        """
        cfg = self.config
        samples = [stream_sample(s, i, cfg.data_seed, cfg.eval_seed, self.shape.image_size) for s, i in items]
        pixel_values = self.processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
        seqs, labels, probe_pos, probe_targets = [], [], [], []
        for b, (s, (stream, index)) in enumerate(zip(samples, items, strict=True)):
            turns = [(s.family, s.question, s.answer), *(q[:3] for q in self._extra_questions(s, stream, index))]
            ids: list[int] = []
            lab: list[int] = []
            for t, (family, question, answer) in enumerate(turns):
                p = self._prompt_ids(question) if t == 0 else self._turn_ids(question)
                a = self._answer_ids(answer)
                ids += p
                lab += [IGNORE] * len(p)
                probe_pos.append((b, len(ids)))
                probe_targets.append(question_targets(question, family))
                ids += a
                lab += a
            seqs.append(ids)
            labels.append(lab)
        length = max(len(x) for x in seqs)
        input_ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)  # (B, L)
        label_t = torch.full((len(seqs), length), IGNORE, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)  # (B, L)
        for b, (x, y) in enumerate(zip(seqs, labels, strict=True)):
            input_ids[b, : len(x)] = torch.tensor(x)
            label_t[b, : len(y)] = torch.tensor(y)
            mask[b, : len(x)] = 1
        aux = torch.from_numpy(
            np.stack([token_labels(s.objects, self.shape.image_size, self.grid, self.grid) for s in samples])
        )  # (B, 3, N)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t, "pixel_values": pixel_values,
                "aux": aux, "probe_pos": torch.tensor(probe_pos), "probe_targets": torch.tensor(probe_targets),
                "families": [s.family for s in samples]}

    # -- loss ---------------------------------------------------------------------------------
    def _forward(self, model: nn.Module, batch: dict, capture: bool):
        caps = {}
        if capture:
            caps["vis"] = Capture(transformers_model(model).model.multi_modal_projector)
            caps["q"] = Capture(llm_layer(model, self.config.question_layer))
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"])
            feats = {k: c.pop() for k, c in caps.items()}
        finally:
            for c in caps.values():
                c.remove()
        return out.logits, feats  # (B, L, V), {"vis": (B, N, D), "q": (B, L, D)}

    def loss(self, model: nn.Module, heads: nn.ModuleDict, batch: dict, aux_weight: float):
        """Answer-token cross-entropy plus ``aux_weight`` x the per-token and question probe losses.

        Nothing here depends on the question's region: the per-token probes label what object
        covers each token (the same for every question), the question probes read the question.
        """
        logits, feats = self._forward(model, batch, capture=aux_weight > 0)
        labels = batch["labels"][:, 1:]  # (B, L-1): token t+1 is predicted at t
        ans = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
        logs = {"ans": float(ans.detach())}
        total = ans
        if aux_weight > 0:
            vis = feats["vis"].reshape(batch["aux"].shape[0], -1, feats["vis"].shape[-1])  # (B, N, D)
            aux = token_probe_loss(heads, ("shape", "color", "digit"), vis, batch["aux"],
                                   weights=(1.0, 1.0, self.config.digit_weight))
            pos = batch["probe_pos"]  # (Q, 2)
            hidden = feats["q"][pos[:, 0], pos[:, 1]]  # (Q, D)
            qloss = question_probe_loss(heads, hidden, batch["probe_targets"]) if "qfamily" in heads else aux * 0
            logs["aux"] = float(aux.detach())
            logs["qaux"] = float(qloss.detach())
            total = total + aux_weight * (aux + qloss)
        logs["loss"] = float(total.detach())
        return total, logs

    def quick_val(self, model: nn.Module, batch: dict) -> dict:
        """Teacher-forced exact match (every answer token and ``</s>`` argmax-correct), per family."""
        logits, _ = self._forward(model, batch, capture=False)
        labels = batch["labels"][:, 1:]
        pred = logits[:, :-1].argmax(-1)  # (B, L-1)
        ok = ((pred == labels) | (labels == IGNORE)).all(1)  # (B,)
        out = {"acc": float(ok.float().mean())}
        for fam in FAMILIES:
            idx = [i for i, f in enumerate(batch["families"]) if f == fam]
            if idx:
                out[fam] = float(ok[idx].float().mean())
        return out

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, processor: Any, config: TrainConfig) -> dict:
        """Greedy-generate answers on ``config.eval_n`` held-out samples with all visual tokens."""
        return evaluate_answerer(model, processor, config.eval_split, config.eval_n, config.eval_seed)

    def export(self, model: nn.Module, processor: Any, out_dir: Path, summary: dict) -> None:
        """Save the weights, configs and model card into ``out_dir``."""
        from crop.embedded import save_embedded
        from crop.train.cards import answerer_card

        meta = {"kind": self.kind, "prompt": "processor chat template (image + question), add_generation_prompt=True",
                "visual_grid": [self.grid, self.grid], "training": _compact(summary)}
        save_embedded(model, self.architecture, asdict(self.shape), out_dir, meta, answerer_card(summary, asdict(self.shape)))


def _compact(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "history"}


@torch.no_grad()
def evaluate_answerer(model: nn.Module, processor: Any, split: str = "test", n: int = 800, seed: int = 0,
                      batch_size: int = 16, max_new_tokens: int = 8) -> dict:
    """Accuracy of an answerer on ``n`` samples of the benchmark, per family, all visual tokens.

    Args:
        model: a LLaVA-style model.
        processor: its processor (chat template).
        split: benchmark split.
        n: number of samples (families are balanced round-robin).
        seed: benchmark seed.
        batch_size: samples per ``generate`` call (left-padded).
        max_new_tokens: decode budget.

    Returns:
        ``{"accuracy": float, "per_family": {family: float}, "n": int, "examples": [...]}``.

    Raises:
        TypeError: if ``model`` cannot ``generate`` (not a transformers generative model).
    """
    from transformers import GenerationMixin

    from crop.data.synth import generate

    if not isinstance(model, GenerationMixin):
        raise TypeError(f"the answerer must be a generative transformers model, got {type(model).__name__}")
    model.eval()
    tok = processor.tokenizer
    correct: dict[str, list[bool]] = defaultdict(list)
    examples: list[dict] = []
    samples = list(generate(n, seed, split))
    for start in range(0, n, batch_size):
        chunk = samples[start:start + batch_size]
        texts = [answerer_prompt(processor, s.question) for s in chunk]
        side, tok.padding_side = tok.padding_side, "left"
        try:
            inputs = processor(images=[s.image for s in chunk], text=texts, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        preds = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for s, p in zip(chunk, preds, strict=True):
            ok = answers_match(p, s.answer)
            correct[s.family].append(ok)
            if len(examples) < 12:
                examples.append({"id": s.id, "question": s.question, "answer": s.answer, "prediction": p.strip()})
    per_family = {f: round(sum(v) / len(v), 4) for f, v in correct.items()}
    total = [x for v in correct.values() for x in v]
    return {"split": split, "seed": seed, "n": len(total), "accuracy": round(sum(total) / len(total), 4),
            "per_family": per_family, "examples": examples}
