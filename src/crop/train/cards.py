"""Model cards of the embedded models, rendered from a training summary."""

from __future__ import annotations

import json


def _common(summary: dict, shape: dict) -> str:
    cfg = summary["config"]
    env = summary.get("environment", {})
    stop = " (stopped by the wall-clock budget)" if summary.get("stopped_by_time_budget") else ""
    return (
        f"## Training\n\n"
        f"- Data: the synthetic localized-VQA benchmark (`crop.data.synth`), train split, seed {cfg['data_seed']}, "
        f"generated on the fly with 2-4 digit cards per scene (the benchmark has 1-3); first "
        f"{cfg['curriculum_fraction']:.0%} of steps on sparse scenes (3-8 objects).\n"
        f"- Steps: {summary['steps_run']} of {summary['steps_planned']} planned{stop}, batch {cfg['batch_size']} "
        f"({summary['samples_seen']} samples).\n"
        f"- Optimizer: AdamW (betas 0.9/0.98, weight decay {cfg['weight_decay']}), peak LR {cfg['lr']}, "
        f"{cfg['warmup_steps']} warmup steps, cosine to {cfg['min_lr_ratio']} x peak"
        f"{' (progress = max(step, wall-time) fraction)' if cfg.get('time_aware_schedule') and cfg.get('max_minutes') else ''}, "
        f"grad clip {cfg['grad_clip']}, seed {cfg['seed']}.\n"
        f"- Auxiliary per-visual-token probe losses (weight {cfg['aux_weight']}, object and background tokens "
        f"weighted half each{_digit_weight(cfg)}), training only; the probes are not part of the shipped weights.\n"
        + (f"- Warm start: the weights were initialized from `{cfg['init_from']}` (see the notes below); the "
           "steps above are this run's only.\n" if cfg.get("init_from") else "")
        + f"- Wall time: {summary['train_wall_minutes']} min training + {summary['eval_wall_minutes']} min evaluation, "
        f"{cfg['threads']} torch thread(s) on a shared 2-core CPU "
        f"(torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}).\n"
        f"- Parameters: {summary['parameters']:,}. Sizes: `{json.dumps(shape)}`.\n"
    )


def _signals(cfg: dict, shape: dict) -> str:
    """Every training signal of the answerer, as its card must list them (it judges pruning methods)."""
    if shape.get("question_first") or cfg.get("attn_weight", 0) > 0:
        return ""  # the earlier question-first recipe; its notes describe its signals
    parts = cfg.get("init_parts", "all")
    lines = [
        "\n## Training signals (all of them)\n",
        "- The answer tokens' cross-entropy (the benchmark's question and, as further chat turns, up to "
        f"{cfg.get('turns', 1) - 1} other questions about the same scene).",
        "- Per-visual-token linear probes on the projector output for the shape, colour and digit of the object "
        "under each token: the same for every question (they stand in for a pretrained vision tower)."
        if cfg.get("aux_weight", 0) > 0 else "- No per-token probes.",
        "- Linear probes at each answer's first position for what the question text asks (family, shape, colour, "
        "direction words); they read the question, never the image or its region." if cfg.get("aux_weight", 0) > 0
        else "",
        "- **Not used:** attention supervision, region-membership probes, any probe on image tokens that depends on "
        "the question, anything derived from the question's ground-truth region or from a pruning method.",
    ]
    if cfg.get("init_from"):
        lines.append(f"- Warm start of {'the vision tower and projector only' if parts == 'vision' else 'every weight'} "
                     f"from `{cfg['init_from']}`"
                     + (" (the earlier question-first answerer, whose recipe used region and attention "
                        "supervision; the vision tower never sees the question, and the language model here starts "
                        "from random weights)" if parts == "vision" else "") + ".")
    if cfg.get("freeze_parts", "none") == "vision":
        lines.append("- The vision tower and projector were frozen: only the language model was trained.")
    if cfg.get("tiny_fraction", 0):
        lines.append(f"- Curriculum: the first {cfg['tiny_fraction']:.0%} of steps on scenes of 3-4 objects, then "
                     f"{cfg['curriculum_fraction']:.0%} on 3-8 objects, then the training mix.")
    if cfg.get("dense_fraction", 0):
        lines.append(f"- {cfg['dense_fraction']:.0%} of each batch of the training mix on dense scenes (12-16 objects "
                     "of 30-46 px at 336, the hard end of the training range), from the train split's own stream.")
    return "\n".join(x for x in lines if x) + "\n"


def _digit_weight(cfg: dict) -> str:
    weight = cfg.get("digit_weight", 1.0)
    return "" if weight == 1.0 else f"; the digit probe weighted {weight:g}x"


def _notes(summary: dict) -> str:
    notes = summary.get("notes")
    return f"\n## How these weights were produced\n\n{notes.strip()}\n" if notes else ""


def answerer_card(summary: dict, shape: dict) -> str:
    """``MODEL_CARD.md`` of the answerer."""
    m = summary["metrics"]
    fam = "\n".join(f"| {f} | {v:.1%} |" for f, v in m["per_family"].items())
    grid = shape["image_size"] // shape["patch_size"]
    return (
        "# crop embedded answerer\n\n"
        f"A `LlavaForConditionalGeneration` (CLIP vision tower, 2-layer projector, Llama LM) trained from scratch "
        f"on this repository's synthetic benchmark. {shape['image_size']} px input, {shape['patch_size']} px patches: "
        f"{grid}x{grid} = {grid * grid} visual tokens (2x2 per cell of the 8x8 region grid). Byte-level tokenizer "
        "and chat template built in code (`crop.models.tiny.llava_processor`)"
        + ("; the template is question-first, `USER: q\\n<image>\\nq ASSISTANT:`, so the image tokens see the "
           "question" if shape.get("question_first") else "; the template is the standard image-first LLaVA-1.5 "
           "layout, `USER: <image>\\nq ASSISTANT:`") + f". Its language model has {shape['text_layers']} decoder "
        "layers.\n\n"
        "A toy model for demonstrating and measuring token pruning offline; it knows only this benchmark's "
        "shapes, colours, digits and counts.\n\n"
        + _common(summary, shape) + _signals(summary["config"], shape)
        + f"\n## Evaluation ({m['split']} split, seed {m['seed']}, {m['n']} samples, all visual tokens, greedy)\n\n"
        f"Overall accuracy (normalized exact match): **{m['accuracy']:.1%}**\n\n"
        f"| family | accuracy |\n|---|---|\n{fam}\n" + _notes(summary) + "\n"
        "Reproduce: `crop train answerer` (see `crop train answerer --help`); evaluate only: "
        "`crop train answerer --eval-only`.\n"
    )


def _cost_row(r: dict) -> str:
    """One batch size's row; records from before batch timing lack ``batch_size`` and the A / P ratio."""
    a_over_p = r.get("ratio_generate_to_answerer_prefill",
                     round(r["localizer_generate_ms"] / r["answerer_prefill_ms"], 3))
    return (f"| {r.get('batch_size', 1)} | {r['localizer_ms']} | {r['localizer_generate_ms']} | "
            f"{r['answerer_prefill_ms']} | {r['answerer_preprocess_ms']} | **{a_over_p}** | "
            f"{r['ratio_to_answerer_prefill']} | {r['ratio_to_answerer_preprocess_and_prefill']} |")


def _cost_section(cost: dict | list[dict] | None) -> str:
    """The card's cost table: one row per measured batch size (see ``crop train cost``)."""
    if not cost:
        return ""
    runs = cost if isinstance(cost, list) else [cost]
    first = runs[0]
    rows = "\n".join(_cost_row(r) for r in runs)
    return (
        f"\n## Cost vs the answerer (ms per image, median of {first['n']} batches, {first['threads']} thread(s))\n\n"
        "A = localizer prefill + box decode; P = answerer prefill over all visual tokens; L = localizer end to end "
        "(A plus its preprocessing); Q = answerer preprocessing.\n\n"
        "| batch | L | A | P | Q | A / P | L / P | L / (Q + P) |\n|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Localizer: {first['localizer_input_tokens']} input tokens, {first['localizer_new_tokens']:.1f} generated; "
        f"answerer: {first['answerer_input_tokens']} input tokens. Analytic forward FLOPs: localizer "
        f"{first['localizer_gflops']} GFLOP vs answerer prefill {first['answerer_prefill_gflops']} GFLOP (ratio "
        f"{first['flops_ratio']}). At this toy scale wall time is dominated by per-call and per-layer overhead, not "
        "arithmetic; batching amortizes it.\n"
    )


def _patch_text(shape: dict) -> str:
    """How the localizer's vision tower cuts a 224 px image (``QwenShape.patch_size``/``merge_size``)."""
    patch, merge = shape.get("patch_size", 14), shape.get("merge_size", 2)
    side = 224 // patch
    text = f"{side}x{side} patches of {patch} px"
    if merge > 1:
        text += f", merged {merge}x{merge} into {side // merge}x{side // merge} tokens"
    return text


def localizer_card(summary: dict, shape: dict) -> str:
    """``MODEL_CARD.md`` of the localizer."""
    m = summary["metrics"]
    rows = "\n".join(
        f"| {f} | {v['mean_iou']:.3f} | {v['contains_rate']:.1%} | {v['exact_rate']:.1%} | {v['fallback_rate']:.1%} |"
        for f, v in m["per_family"].items()
    )
    cost_txt = _cost_section(summary.get("cost"))
    return (
        "# crop embedded localizer\n\n"
        "A `Qwen2VLForConditionalGeneration` trained from scratch to answer "
        "`crop.localizers.prompt.localizer_prompt(question, 8)` with the region as `[x0, y0, x1, y1]` on the 8x8 "
        "grid (`format_box`) followed by `<|im_end|>` (the CROP paper's localizer recipe, at toy scale). Images are "
        f"resized to 224x224: {_patch_text(shape)}, one LLM token per grid cell. Global questions answer "
        "`[0, 0, 7, 7]`. The prompt is text-first (`localizer_messages(question, 8, image_first=False)`), so the "
        "causal LLM lets every image token read the question; the tokenizer is Qwen2's byte-level BPE plus one "
        "token per benchmark word (`crop.models.tokenizers.qwen_word_tokenizer`, built in code)"
        + ("" if shape.get("tokenizer") != "words+corners" else
           " plus two tokens per box, its corners `[x0, y0,` and ` x1, y1]` (`grid_corner_tokens`): `VLMLocalizer` "
           "stops at the `]`, so a box costs one prefill and one decode step")
        + ". Serve it with "
        "`crop.localizers.make_localizer(\"embedded\")` (or `VLMLocalizer(model, processor, grid=8, "
        "image_first=False)`).\n\n"
        + _common(summary, shape) + _signals(summary["config"], shape)
        + f"\n## Evaluation ({m['split']} split, seed {m['seed']}, {m['n']} samples, greedy, via `VLMLocalizer`)\n\n"
        f"Mean IoU with the ground-truth grid box: **{m['mean_iou']:.3f}**; ground truth inside the prediction: "
        f"**{m['contains_rate']:.1%}**; exact box: {m['exact_rate']:.1%}; unparsable (full-image fallback): "
        f"{m['fallback_rate']:.1%}; mean predicted area: {m['mean_area']:.1%} of the image.\n\n"
        "| family | mean IoU | GT inside | exact | fallback |\n|---|---|---|---|---|\n"
        f"{rows}\n" + cost_txt + _notes(summary)
        + "\nReproduce: `crop train localizer` (see `crop train localizer --help`); cost: `crop train cost`.\n"
    )
