"""Choose CROP-self's defaults from data: does the answerer's own attention before layer K find the region?

For every CROP-self variant (whose attention: the last token or all text after the image; layer
K-1 alone or the mean over layers < K; the box rule and its parameter) and every K asked for,
the self box of each sample of the synthetic *validation* split is computed by the method
itself (``CropSelf`` on the model, the forward stopped once layer K has chosen), and compared
with the ground-truth box: mean IoU and the share of boxes containing it, overall and per
family. Question-blind boxes (the whole image, a centred box) are the floor to beat. The test
split is left for the final comparison (README), so the defaults are not tuned on it.

Usage:
    .venv/bin/python scripts/self_localizer_study.py --model embedded --layers 1,2,3 \\
        --out results/self-localizer-study/embedded
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from crop.api import apply_method
from crop.config import CropSelfConfig
from crop.eval.metrics import box_metrics
from crop.eval.provenance import git_hash, versions
from crop.eval.runner import EvalSpec, load_samples
from crop.models import get_adapter
from crop.models.loading import load_model
from crop.pipeline import chat_prompt
from crop.regions import GridBox

RULES = [{"rule": "price", "price": 1.0}, {"rule": "share", "share": 0.7}]
BLIND = {"full image": GridBox.full(), "centre 6x6": GridBox(1, 1, 6, 6), "centre 4x4": GridBox(2, 2, 5, 5)}


class _Chosen(Exception):
    """Raised at layer K once the box is chosen: the rest of the forward is not needed here."""


def variants():
    """Every (queries, attention_layers, rule) combination studied."""
    for queries, layers, rule in itertools.product(("last", "text"), ("last", "all"), RULES):
        yield {"queries": queries, "attention_layers": layers, **rule}


def self_boxes(model, processor, samples, config: CropSelfConfig, batch_size: int) -> list[GridBox]:
    """The box CROP-self finds for each sample (the forward runs up to layer K only)."""
    def stop(module, args, kwargs):
        raise _Chosen

    processor.tokenizer.padding_side = "left"
    boxes: list[GridBox] = []
    with apply_method(model, config) as handle:
        # registered after the method's own hook on layer K, so it runs once the box is chosen
        stop_handle = get_adapter(model).decoder_layers()[config.layer].register_forward_pre_hook(
            stop, with_kwargs=True)
        try:
            for start in range(0, len(samples), batch_size):
                chunk = samples[start:start + batch_size]
                inputs = processor(images=[s.image for s in chunk], text=[chat_prompt(processor, s.question)
                                                                           for s in chunk],
                                   padding=True, return_tensors="pt")
                try:
                    with torch.no_grad():
                        model(**handle.prepare(inputs))
                except _Chosen:
                    pass
                boxes.extend(handle.stats.boxes)
        finally:
            stop_handle.remove()
    return boxes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="answerer: 'embedded' or a folder exported by crop train")
    p.add_argument("--n", type=int, default=200, help="validation samples (default 200)")
    p.add_argument("--layers", default="1,2", help="comma-separated K values (default 1,2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--note", default="", help="a sentence recorded with the results (e.g. how the answerer was trained)")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)

    model, processor = load_model(args.model)
    samples = load_samples(EvalSpec(methods=["crop-self"], keep_tokens=[64], n=args.n, split="val"))
    gts = [GridBox(*s.box_grid) for s in samples]
    families = [s.family for s in samples]
    rows = [{"layer": None, "variant": name, **box_metrics([box] * len(samples), gts, families)}
            for name, box in BLIND.items()]
    todo = [(int(k), v) for k in args.layers.split(",") for v in variants()]
    for layer, choice in tqdm(todo, desc="variants", file=sys.stderr):
        boxes = self_boxes(model, processor, samples, CropSelfConfig(keep_tokens=64, layer=layer, **choice),
                           args.batch_size)
        rows.append({"layer": layer, "variant": choice, **box_metrics(boxes, gts, families)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"split": "val", "n": args.n, "model": args.model, "note": args.note, "versions": versions(),
               "git": git_hash(), "rows": rows}
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    (out / "results.md").write_text(table(payload), encoding="utf-8")
    print(table(payload))
    return 0


def _label(variant) -> str:
    if isinstance(variant, str):
        return f"{variant} (question-blind)"
    param = variant.get("price", variant.get("share"))
    return f"{variant['queries']} / {variant['attention_layers']} / {variant['rule']} {param}"


def table(payload) -> str:
    """The study as a markdown table: question-blind floors, then each K's variants, best IoU first."""
    families = sorted(k for k, v in payload["rows"][0].items() if isinstance(v, dict) and k != "all")
    lines = [f"Self-box quality, synthetic val split (n={payload['n']}), answerer `{payload['model']}` "
             f"(git {payload['git'][:7]}). {payload['note']}".rstrip(), "",
             "| K | queries / layers / rule | IoU | contains GT | " + " | ".join(f"IoU {f}" for f in families) + " |",
             "|---|---|---|---|" + "---|" * len(families)]
    ordered = sorted(payload["rows"], key=lambda r: (r["layer"] or 0, -r["all"]["mean_iou"]))
    for row in ordered:
        lines.append(f"| {row['layer'] or '-'} | {_label(row['variant'])} | {row['all']['mean_iou']:.3f} | "
                     f"{100 * row['all']['contains_gt']:.1f}% | "
                     + " | ".join(f"{row[f]['mean_iou']:.3f}" for f in families) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
