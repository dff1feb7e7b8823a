"""``crop train``: train the embedded answerer or localizer, or measure the localizer's cost."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from crop.train.config import TrainConfig
    from crop.train.loop import Task


def _add_common(p: argparse.ArgumentParser, kind: str, defaults: dict) -> None:
    p.add_argument("--steps", type=int, default=defaults["steps"], help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=defaults["lr"], help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic train split")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--eval-split", choices=("val", "test"), default="test")
    p.add_argument("--eval-n", type=int, default=800, help="held-out samples evaluated at the end")
    p.add_argument("--val-every", type=int, default=250, help="steps between quick validations (0 = never)")
    p.add_argument("--val-n", type=int, default=128, help="samples per quick validation")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget over all resumed runs; stops cleanly, then evaluates and saves")
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-token probe losses (0 = off)")
    p.add_argument("--attn-weight", type=float, default=defaults.get("attn_weight", 1.0),
                   help="weight of the attention supervision toward the question's region (0 = off; default %(default)s)")
    p.add_argument("--curriculum-fraction", type=float, default=0.1, help="share of steps on sparse scenes")
    p.add_argument("--tiny-fraction", type=float, default=0.0,
                   help="share of steps, first of all, on scenes of 3-4 objects (default %(default)s)")
    p.add_argument("--dense-fraction", type=float, default=0.0,
                   help="share of each batch (after the curriculum) on dense scenes of 12-16 small objects, the "
                        "hard end of the training range (default %(default)s)")
    p.add_argument("--digit-weight", type=float, default=1.0,
                   help="weight of the digit probe among the per-token probes (answerer; default %(default)s)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from the weights of an exported model (e.g. the shipped one) instead of random "
                        "ones; probes, optimizer and schedule start fresh")
    p.add_argument("--init-parts", choices=("all", "vision"), default="all",
                   help="what --init-from loads: every weight, or only the vision tower + projector (default %(default)s)")
    p.add_argument("--freeze-parts", choices=("none", "vision"), default="none",
                   help="parts not trained: none, or the vision tower + projector (default %(default)s)")
    p.add_argument("--shape", type=json.loads, default={}, metavar="JSON",
                   help="model size overrides, e.g. '{\"text_layers\": 2}'")
    p.add_argument("--turns", type=int, default=defaults.get("turns", 1),
                   help="questions per training image as chat turns (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the CPU is shared)")
    p.add_argument("--workers", type=int, default=1, help="data-generating worker processes")
    p.add_argument("--run-dir", default=f"runs/train-{kind}", help="checkpoints and metrics (default %(default)s)")
    p.add_argument("--out", default=None, help="where to export the model (default: the package's embedded weights)")
    p.add_argument("--no-export", action="store_true", help="do not export the trained model")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--eval-only", action="store_true", help="evaluate the exported model at --out and print metrics")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run, kind=kind)


def register(subparsers) -> None:
    """Add the ``train`` subcommand (``answerer``, ``localizer``, ``plc``, ``cost``) to ``subparsers``."""
    p = subparsers.add_parser("train", help="train the embedded models", description=(
        "Train the embedded models from scratch on the synthetic benchmark (seeded, resumable, time-boxed), "
        "evaluate them on the held-out split, and export safetensors weights + configs + model card."))
    sub = p.add_subparsers(dest="train_command", metavar="MODEL", required=True)
    a = sub.add_parser("answerer", help="the LLaVA-architecture answerer")
    # the shipped answerer's recipe: single-turn, no attention supervision (see its MODEL_CARD.md)
    _add_common(a, "answerer", {"steps": 3000, "lr": 1.5e-3, "turns": 1, "attn_weight": 0.0})
    loc = sub.add_parser("localizer", help="the Qwen2-VL-architecture localizer")
    _add_common(loc, "localizer", {"steps": 3000, "lr": 1.5e-3})
    from crop.train.finetune_localizer import add_finetune_arguments

    add_finetune_arguments(loc)
    plc = sub.add_parser("plc", help="the trained PLC compressor, for a given answerer", description=(
        "Train CROP's PLC compressor (learnable queries; the region's tokens kept as anchors) with the answerer's "
        "LM loss on the answers, the answerer frozen (or with --lora). Writes compressor.safetensors + "
        "compressor.json + MODEL_CARD.md into --out; use it with --method crop-plc-trained --option "
        "compressor=OUT."))
    plc.add_argument("--answerer", default="embedded",
                     help="'embedded' (the shipped answerer), a folder exported by crop train, a local checkpoint or "
                          "hub id (e.g. llava-hf/llava-1.5-7b-hf on a GPU), or a tiny-random-* name (smoke runs)")
    plc.add_argument("--data", default="synth", metavar="{synth,FILE.jsonl}",
                     help="'synth' (the synthetic benchmark's train split) or a region-annotated JSONL with answers "
                          "(the format crop train localizer reads)")
    plc.add_argument("--n-train", type=int, default=20000, help="synthetic training examples (default %(default)s)")
    plc.add_argument("--steps", type=int, default=1000, help="optimizer steps (default %(default)s)")
    plc.add_argument("--batch-size", type=int, default=8)
    plc.add_argument("--lr", type=float, default=1e-3, help="compressor learning rate (default %(default)s)")
    plc.add_argument("--warmup-steps", type=int, default=50)
    plc.add_argument("--seed", type=int, default=0)
    plc.add_argument("--budgets", default="64,128,192", help="budgets drawn per example, of 576 (default %(default)s)")
    plc.add_argument("--context-share", type=float, default=0.25,
                     help="share of the budget made by the compressor; the rest are the region's anchors")
    plc.add_argument("--no-anchors", action="store_true", help="ablation: every token is a compressed one")
    plc.add_argument("--attend", choices=("outside", "all"), default="outside",
                     help="what the queries read: the tokens outside the anchors (default) or all of them")
    plc.add_argument("--max-queries", type=int, default=64, help="the compressor's query bank (default %(default)s)")
    plc.add_argument("--lora", action="store_true", help="also train LoRA adapters on the LLM (peft); merged on save")
    plc.add_argument("--device", default="cpu",
                     help="'cpu' (default), or 'cuda': accelerate places each process (its own GPU under "
                          "accelerate launch)")
    plc.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                     help="autocast through accelerate (default no)")
    plc.add_argument("--checkpoint-every", type=int, default=100)
    plc.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget; stops cleanly, then saves")
    plc.add_argument("--threads", type=int, default=1)
    plc.add_argument("--run-dir", default="runs/train-plc")
    plc.add_argument("--out", required=True, help="folder of the trained compressor")
    plc.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    plc.add_argument("--no-progress", action="store_true")
    plc.set_defaults(func=run_plc)
    c = sub.add_parser("cost", help="time the localizer against the answerer's prefill and record it in its card")
    c.add_argument("--weights-dir", default=None, help="folder holding answerer/ and localizer/ (default: the package's)")
    c.add_argument("--n", type=int, default=20, help="timed batches per batch size (default %(default)s)")
    c.add_argument("--batch", default="1,8", help="comma-separated batch sizes to time (default %(default)s)")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--no-write", action="store_true", help="print only; do not update the localizer's card")
    c.set_defaults(func=run_cost)


def _config(args: argparse.Namespace) -> TrainConfig:
    from crop.train.config import TrainConfig

    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
        data_seed=args.data_seed, eval_seed=args.eval_seed, eval_split=args.eval_split, eval_n=args.eval_n,
        val_every=args.val_every, val_n=args.val_n, checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes,
        aux_weight=args.aux_weight, attn_weight=args.attn_weight, curriculum_fraction=args.curriculum_fraction, tiny_fraction=args.tiny_fraction,
        dense_fraction=args.dense_fraction, threads=args.threads,
        workers=args.workers, turns=args.turns, shape=args.shape, digit_weight=args.digit_weight,
        init_from=args.init_from, init_parts=args.init_parts, freeze_parts=args.freeze_parts,
    )


def run(args: argparse.Namespace) -> int:
    """Train (or only evaluate) the model named by ``args.kind``; print the metrics as JSON."""
    import torch

    from crop.embedded import embedded_dir, load_embedded_from
    from crop.errors import CropInputError
    from crop.train.loop import train

    if getattr(args, "base", None):  # fine-tune a pretrained checkpoint (the paper's localizer recipe)
        from crop.train.finetune_localizer import run_finetune_cli

        return run_finetune_cli(args, scratch_lr=1.5e-3)
    try:
        config = _config(args)
    except ValueError as exc:
        raise CropInputError(str(exc)) from exc
    out = args.out or str(embedded_dir(args.kind))
    make_task: Callable[[TrainConfig], Task]
    evaluate: Callable[[nn.Module, Any, str, int, int], dict]
    if args.kind == "answerer":
        from crop.train.answerer import AnswererTask as make_task
        from crop.train.answerer import evaluate_answerer as evaluate
    else:
        from crop.train.localizer import LocalizerTask as make_task
        from crop.train.localizer import evaluate_localizer as evaluate
    if args.eval_only:
        torch.set_num_threads(args.threads)
        try:
            model, processor = load_embedded_from(out)
        except FileNotFoundError as exc:
            raise CropInputError(str(exc)) from exc
        metrics = evaluate(model, processor, args.eval_split, args.eval_n, args.eval_seed)
        print(json.dumps(metrics, indent=2))
        return 0
    try:
        task = make_task(config)
    except (TypeError, ValueError) as exc:
        raise CropInputError(f"bad --shape: {exc}") from exc
    summary = train(task, config, args.run_dir, None if args.no_export else out, resume=args.resume,
                    progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("kind", "steps_run", "train_wall_minutes", "metrics")}, indent=2))
    return 0


def run_plc(args: argparse.Namespace) -> int:
    """``crop train plc``: train a compressor for an answerer; print the summary as JSON."""
    import torch

    from crop.errors import CropInputError
    from crop.models.loading import load_model
    from crop.train.plc import PLCTrainConfig, jsonl_examples, synth_examples, train_plc

    try:
        config = PLCTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                warmup_steps=args.warmup_steps, seed=args.seed,
                                budgets=tuple(int(b) for b in args.budgets.split(",") if b.strip()),
                                context_share=args.context_share, anchors=not args.no_anchors, attend=args.attend,
                                max_queries=args.max_queries, lora=args.lora, checkpoint_every=args.checkpoint_every,
                                max_minutes=args.max_minutes, device=args.device,
                                mixed_precision=args.mixed_precision)
        train = synth_examples(args.n_train, args.seed) if args.data == "synth" else jsonl_examples(args.data)
    except (ValueError, OSError) as exc:
        raise CropInputError(str(exc)) from None
    if not train:
        raise CropInputError("no training examples")
    torch.set_num_threads(max(1, args.threads))
    model, processor = load_model(args.answerer)
    try:
        summary = train_plc(model, processor, train, config, args.run_dir, args.out, args.answerer,
                            resume=args.resume, progress=not args.no_progress)
    except ValueError as exc:
        raise CropInputError(str(exc)) from None
    if not summary["main_process"]:  # accelerate launch: the main process saves and reports
        return 0
    print(json.dumps({k: summary[k] for k in ("steps_run", "processes", "train_wall_minutes", "loss_first_10",
                                              "loss_last_10")}, indent=2))
    return 0


def run_cost(args: argparse.Namespace) -> int:
    """Measure the localizer's cost against the answerer's prefill; record it in the localizer's card."""
    from crop.embedded import (
        embedded_dir,
        load_embedded_answerer,
        load_embedded_localizer,
        load_embedded_metadata,
    )
    from crop.errors import CropInputError
    from crop.train.cards import localizer_card
    from crop.train.localizer import measure_cost

    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError as exc:
        raise CropInputError(f"--batch takes comma-separated whole numbers, e.g. 1,8; got {args.batch!r}") from exc
    if min(batches) < 1 or args.n < 1:
        raise CropInputError(f"--batch sizes and --n must be >= 1, got --batch {args.batch} --n {args.n}")
    try:
        loc = load_embedded_localizer(args.weights_dir)
        ans = load_embedded_answerer(args.weights_dir)
    except FileNotFoundError as exc:
        raise CropInputError(str(exc)) from exc
    cost = [measure_cost(loc, ans, n=args.n, threads=args.threads, batch_size=b) for b in batches]
    print(json.dumps(cost, indent=2))
    if not args.no_write:
        folder = embedded_dir("localizer", args.weights_dir)
        meta = load_embedded_metadata("localizer", args.weights_dir)
        meta["cost"] = cost
        (folder / "crop_embedded.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        summary = {**meta["training"], "cost": cost}
        (folder / "MODEL_CARD.md").write_text(localizer_card(summary, meta["shape"]), encoding="utf-8")
    return 0
