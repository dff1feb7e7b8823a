"""``crop eval``: accuracy and cost of CROP vs the unpruned model on the synthetic benchmark or your own JSONL."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crop.cli._options import add_option_argument, option_rows, parse_options
from crop.cli.answer import add_device_arguments, device_report, device_settings
from crop.errors import CropInputError

DESCRIPTION = """\
Evaluate methods x budgets on the synthetic localized-VQA benchmark and write
OUT/results.json (config, versions, git hash, per-sample predictions, metrics),
OUT/results.md (a table) and OUT/accuracy_vs_tokens.png.

Budgets are LLaVA-1.5 token counts (of 576), scaled to the same fraction of the answerer's
visual tokens. --match says what a budget means: 'label' (each method's own meaning of the
number), 'equivalent' (every method solved for the same layer-weighted visual tokens) or
'flops' (the same analytic prefill FLOPs, selection and localizer included). A method that
cannot meet a matched target says so in the table instead of running more. The localizer runs
once per sample and its FLOPs count for every region-guided run. 'full' (the unpruned model)
always runs, as the reference. Also writes OUT/accuracy_vs_flops.png (the Pareto chart).
No timings: speed is measured by `crop bench`.

Resume: every finished answer is appended to OUT/progress.jsonl as its batch ends, and
OUT/eval_spec.json records what is evaluated. Run the same command again on the same --out
after a crash or a kill: what is done is skipped and results.json ends as an uninterrupted
run's. Another spec is refused (use another --out, delete the folder, or pass --fresh).

Several processes: `torchrun --nproc-per-node N -m crop eval ...` (or `accelerate launch
--num_processes N -m crop eval ...`) gives each process every N-th batch (on GPU i with
--device cuda or auto); each writes OUT/progress.rank<R>.jsonl and rank 0 merges them into
the same results.json as one process writes. Write --num-samples there, not --n (the
launchers' own parsers read --n as an abbreviation of their options).

Your own data: --data FILE.jsonl replaces the synthetic benchmark. One JSON object per line:
"image" (a path, relative to the file's folder or absolute), "question", "answers" (a string
or a list), optional "box_px" [x0,y0,x1,y1] (pixels) or "box_grid" [x0,y0,x1,y1] (8x8 grid
cells, inclusive), optional "family" and "id". Accuracy is then the normalised exact match
against any answer, and every run also reports the VQA soft score (min(#annotators who gave
the answer / 3, 1), averaged over leave-one-annotator-out subsets, with the answer normalisation
of the official VQA evaluation script). --localizer oracle needs a box on every line.
scripts/convert_vqa.py converts TextVQA- and GQA-style annotation files to this format.
"""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser("eval", help="evaluate CROP on the synthetic benchmark or your own JSONL data",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default="synth", choices=("synth",), help="benchmark (only 'synth' for now)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="synthetic benchmark split (default test)")
    p.add_argument("--data", default=None, metavar="FILE.jsonl",
                   help="evaluate on your own JSONL samples instead of the synthetic benchmark (see above)")
    p.add_argument("--n", "--num-samples", type=int, default=None,
                   help="number of samples (default 200 synthetic; with --data, every line of the file); "
                        "write --num-samples after torchrun or accelerate launch, whose parsers take --n for theirs")
    p.add_argument("--seed", type=int, default=0, help="synthetic benchmark seed, also the methods' seed (default 0)")
    p.add_argument("--methods", default="full,crop-ilp,crop-plc", help="comma-separated registered names or aliases: full, crop-ilp, crop-plc, crop-self, fastv, dart, ... "
                        "(see 'crop methods')")
    p.add_argument("--keep-tokens", default="64,128,192", help="comma-separated budgets, as counts of 576")
    p.add_argument("--localizer", default="embedded",
                   help="'embedded', 'oracle' (ground-truth boxes, the ceiling for localization), 'full', "
                        "'self' (no localizer model: crop-ilp runs as crop-self, the answerer's own attention "
                        "picks the box), 'grounding:<path or hub id>' (a stock instruct Qwen2-VL / Qwen2.5-VL / "
                        "Qwen3-VL asked zero-shot for the box), or a path / hub id of a localizer VLM")
    p.add_argument("--model", default="embedded", help="answerer: 'embedded', a tiny-random-* name, a path or hub id")
    p.add_argument("--layer", type=int, default=2,
                   help="K of single-stage inner-LLM methods (crop-ilp, fastv, dart, random-inner; default 2)")
    p.add_argument("--match", choices=("label", "equivalent", "flops"), default="label",
                   help="how a budget becomes each method's budget (default %(default)s; see above)")
    p.add_argument("--pool", type=int, default=4, help="PLC pooling block (default 4)")
    add_option_argument(p)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per generate call (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (default 8)")
    add_device_arguments(p)
    p.add_argument("--out", required=True, help="output directory (a run on it is resumed; see above)")
    p.add_argument("--fresh", action="store_true",
                   help="drop the progress saved in --out instead of resuming it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``crop eval``; returns the exit code."""
    from tqdm import tqdm

    from crop.eval.progress_store import ProgressStore, Shard, fingerprint, runtime_settings
    from crop.eval.report import markdown_table, plot_accuracy_vs_flops, plot_accuracy_vs_tokens
    from crop.eval.runner import EvalSpec, check_oracle, load_samples, run_eval
    from crop.localizers import make_localizer
    from crop.models.loading import load_model

    if args.n is not None and args.n < 1:
        raise CropInputError(f"--n must be >= 1, got {args.n}")
    n = args.n if args.n is not None else (200 if args.data is None else 10**9)
    try:
        budgets = [int(k) for k in _csv(args.keep_tokens)]
        spec = EvalSpec(methods=_csv(args.methods), keep_tokens=budgets, n=n, split=args.split, seed=args.seed,
                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, layer=args.layer,
                        pool=args.pool, match=args.match, options=option_rows(parse_options(args.option)),
                        data=args.data)
    except ValueError as exc:
        raise CropInputError(f"bad arguments: {exc}") from None
    try:  # the data file is read and checked before any model loads
        samples = load_samples(spec)
        if args.localizer == "oracle":
            check_oracle(samples)
    except ValueError as exc:
        raise CropInputError(f"--data: {exc}" if args.data else str(exc)) from None
    spec.n = len(samples)
    try:
        shard = Shard.from_env()
    except ValueError as exc:
        raise CropInputError(f"RANK / WORLD_SIZE: {exc}") from None
    out = Path(args.out)
    store = ProgressStore(out, shard)
    try:  # before any model loads: a folder of another evaluation is refused at once
        runtime = runtime_settings(args.device, args.dtype, args.attn, getattr(args, "device_map", None))
        store.prepare(fingerprint(spec, args.model, args.localizer, runtime), fresh=args.fresh)
    except ValueError as exc:
        raise CropInputError(str(exc)) from None
    if shard.world_size > 1:
        _device_per_rank(args)
    load_kwargs, localizer_device = device_settings(args)
    model, processor = load_model(args.model, **load_kwargs)
    localizer = None if args.localizer == "oracle" else make_localizer(args.localizer, device=localizer_device)
    bar = None
    desc = "crop eval" if shard.world_size == 1 else f"crop eval [{shard.rank}/{shard.world_size}]"

    def progress_factory(total, initial=0):
        nonlocal bar
        bar = tqdm(total=total, initial=initial, desc=desc, unit="answer", file=sys.stderr, position=shard.rank)
        return bar.update

    try:
        results = run_eval(model, processor, localizer, spec, args.localizer, args.model, progress_factory, samples,
                           store=store)
    except ValueError as exc:
        raise CropInputError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    if not results:  # another rank than 0: its rows are in its progress file, rank 0 writes the results
        print(f"rank {shard.rank}: wrote {store.path}")
        return 0
    results["devices"] = device_report(model, localizer, args)
    (out / "results.json").write_text(json.dumps(results, separators=(",", ":")) + "\n", encoding="utf-8")
    table = markdown_table(results)
    if args.data is not None:  # the table's footer names the synthetic benchmark; say which file it was
        table = table.replace(f"Benchmark: synth/{results['benchmark']['split']},", f"Benchmark: {args.data},", 1)
        table += _vqa_table(results)
    (out / "results.md").write_text(table, encoding="utf-8")
    plot_accuracy_vs_tokens(results, out / "accuracy_vs_tokens.png")
    plot_accuracy_vs_flops(results, out / "accuracy_vs_flops.png")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy_vs_tokens.png'}, "
          f"{out / 'accuracy_vs_flops.png'}")
    return 0


def _device_per_rank(args: argparse.Namespace) -> None:
    """Under a launcher, put each process on its own GPU (``cuda:LOCAL_RANK``) unless a device index was given.

    Args:
        args: the parsed arguments; ``--device`` and ``--localizer-device`` are rewritten in place.
    """
    import os

    import torch

    if not torch.cuda.is_available() or getattr(args, "device_map", None) is not None:
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    for name in ("device", "localizer_device"):
        value = getattr(args, name, None)
        if value is not None and value.strip().lower() in ("auto", "cuda"):
            setattr(args, name, f"cuda:{local}")


def _vqa_table(results: dict) -> str:
    """The VQA soft score of every run (JSONL data), as a small markdown table."""
    lines = ["", "| method | budget (of 576) | exact match | VQA score | VQA score kept vs full |",
             "|---|---|---|---|---|"]
    for r in results["runs"]:
        if "vqa_score" not in r:
            continue
        label = "-" if r["keep_tokens_576"] is None else str(r["keep_tokens_576"])
        lines.append(f"| {r['method']} | {label} | {100 * r['accuracy']:.1f}% | {100 * r['vqa_score']:.1f}% | "
                     f"{100 * r['vqa_score_kept']:.1f}% |")
    return "\n".join(lines) + "\n"
