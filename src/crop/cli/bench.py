"""``crop bench``: prefill, decode, KV memory and FLOPs per method, localizer included, vs the ideal."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crop.cli._options import add_option_argument, option_rows, parse_options
from crop.cli.answer import add_device_arguments, device_report, device_settings
from crop.errors import CropInputError

DESCRIPTION = """\
Measure, in one process, interleaving cases, medians and min/max over R repeats after a
warm-up: vision tower, localizer (prefill + box decode), selection/compression, LLM prefill,
decode per token, end-to-end; KV-cache bytes after prefill (read from the cache) against
the analytic count; analytic FLOPs per component; and, for each budget, the ideal (the
same kept tokens fed from layer 0). Writes OUT/bench.json, OUT/bench.md, OUT/bench.png.

Models: 'tiny-random-llava', 'llava-shape-0.5b' (CLIP ViT-L/14-336-shaped tower, ~0.5B
Llama LM), 'qwen3-vl-shape-2b' (Qwen3-VL-2B's sizes, DeepStack included, 768 px images = 576
visual tokens) -- both random weights with realistic proportions, for costs on a CPU --
'embedded', any tiny-random-* name, a path or hub id.
On a GPU (--device cuda) every clock reading waits for the queued kernels
(torch.cuda.synchronize), and bench.json records the devices, dtype and GPU names.
"""


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CropInputError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    p = subparsers.add_parser("bench", help="measure speed, memory and FLOPs per method", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random-llava", help="answering VLM (default tiny-random-llava)")
    p.add_argument("--localizer", default="oracle",
                   help="'oracle' (ground-truth boxes, no cost), 'embedded', 'full', 'box:x0,y0,x1,y1', or a path")
    p.add_argument("--methods", default="full,crop-ilp,crop-plc",
                   help="comma-separated method names (see 'crop methods'); full always runs as the reference")
    p.add_argument("--keep-tokens", default="64,128,192", help="budgets as counts of 576 (default 64,128,192)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="measured repeats after one warm-up (default 3)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per answer (default 32)")
    p.add_argument("--layer", type=int, default=2, help="ILP's K (default 2)")
    add_option_argument(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    add_device_arguments(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--render-only", action="store_true",
                   help="do not measure: re-render OUT/bench.md and OUT/bench.png from OUT/bench.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``crop bench``; returns the exit code."""
    import torch
    from tqdm import tqdm

    from crop.eval.bench import BenchSpec, run_bench
    from crop.localizers import make_localizer
    from crop.models.loading import load_model

    out = Path(args.out)
    if args.render_only:
        try:
            results = json.loads((out / "bench.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CropInputError(f"cannot read {out / 'bench.json'}: {exc}") from None
        return _write_reports(results, out)
    try:
        spec = BenchSpec(methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                         keep_tokens=_ints(args.keep_tokens), batches=_ints(args.batch), repeats=args.repeats,
                         new_tokens=args.new_tokens, layer=args.layer,
                         options=option_rows(parse_options(args.option)))
    except ValueError as exc:
        raise CropInputError(str(exc)) from None
    load_kwargs, localizer_device = device_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_model(args.model, **load_kwargs)
    localizer = None if args.localizer == "oracle" else make_localizer(args.localizer, device=localizer_device)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(spec.batches) * (spec.repeats + 1), desc="crop bench", unit="round", file=sys.stderr) as bar:
        try:
            results = run_bench(model, processor, localizer, spec, args.model, args.localizer, bar.update)
        except ValueError as exc:
            raise CropInputError(str(exc)) from None
    results["devices"] = device_report(model, localizer, args)
    (out / "bench.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return _write_reports(results, out)


def _write_reports(results: dict, out: Path) -> int:
    """Write the markdown table and the plot for ``results`` into ``out``; print the table."""
    from crop.eval.bench_report import bench_table, plot_breakdown

    table = bench_table(results)
    (out / "bench.md").write_text(table, encoding="utf-8")
    plot_breakdown(results, out / "bench.png")
    print(table)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
    return 0
