"""``crop answer IMAGE QUESTION``: answer one visual question with CROP and show what it cost."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from crop.cli._options import add_option_argument, parse_options
from crop.errors import CropInputError

DESCRIPTION = """\
Answer a question about an image with a fraction of the visual tokens.

The localizer finds the region of the image the question is about (on a GRID x GRID grid);
then the visual tokens outside it are dropped after decoder layer K (--method ilp), or
pooled before the LLM (--method plc). --method none runs the unpruned model.
The report shows the answer, the region used, visual tokens in and kept per stage, the KV
cache after prefill, and timings (the localizer's time is always included).

Refused before any model loads (one-line error, exit code 2): images over the pixel limit
(--max-image-pixels), with a side under 4 px or an aspect ratio over 50:1, and an --overlay
path that is not a .png in an existing, writable folder. EXIF orientation is applied and
16-bit / 32-bit / float images are scaled to 8 bits (see crop.io.load_image).
"""

EPILOG = """\
examples:
  crop answer --sample "What color is the star?"
  crop answer photo.jpg "What color is the star?"
  crop answer photo.jpg "What number is on the card?" --method plc --keep-tokens 64
  crop answer img.png "What is this?" --model tiny-random-llava --localizer box:2,2,5,5 --json
  crop answer img.png "What is this?" --model llava-hf/llava-1.5-7b-hf --localizer ./my-qwen2vl-localizer
  crop answer img.png "What is this?" --model llava-hf/llava-1.5-7b-hf --localizer grounding:Qwen/Qwen2.5-VL-3B-Instruct
  crop answer img.png "Which bus?" --model llava-hf/llava-1.5-13b-hf --device cuda:0 --dtype bfloat16 \\
      --localizer ./my-qwen2vl-localizer --localizer-device cuda:1
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``answer`` subcommand."""
    p = subparsers.add_parser("answer", help="answer a question about an image with CROP", description=DESCRIPTION,
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", nargs="?", default=None, help="path to the image file (omit it with --sample)")
    p.add_argument("question", help="the question, in quotes")
    p.add_argument("--sample", action="store_true",
                   help="use the sample image shipped with the package (a synthetic scene) instead of IMAGE")
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse images with more than N pixels before decoding them (default: Pillow's "
                        "decompression-bomb limit, about 89.5 million); raise it only for trusted input")
    p.add_argument("--model", default="embedded",
                   help="answering VLM: 'embedded' (default, the shipped toy LLaVA), a tiny-random-* name "
                        "(llava, llava-next, llava-onevision, qwen2-vl, qwen2.5-vl, qwen3-vl, internvl, gemma3: random "
                        "weights, smoke tests only), or a local path / hub id of a LLaVA-1.5, LLaVA-NeXT, "
                        "LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL or Gemma 3 checkpoint")
    p.add_argument("--localizer", default=None,
                   help="'full' (whole image), 'box:x0,y0,x1,y1' (grid cells, inclusive), 'self' (no second "
                        "model: the answerer's own attention before layer K picks the box; ILP becomes crop-self), "
                        "'embedded' (the shipped toy localizer), 'grounding:<path or hub id>' (a stock instruct "
                        "Qwen2-VL / Qwen2.5-VL / Qwen3-VL asked zero-shot for the box), or a path / hub id of a "
                        "generative localizer VLM (default: 'embedded' with the embedded model, else 'full')")
    p.add_argument("--method", default="ilp",
                   help="ilp (CROP inner-LLM pruning, default), plc (CROP pre-LLM compression), none (unpruned), "
                        "or any registered method name (see 'crop methods')")
    p.add_argument("--keep-tokens", type=int, default=None, metavar="N",
                   help="visual tokens per image kept (ILP: after layer K; PLC: reaching the LLM, region + pooled); "
                        "default: exactly the region's tokens")
    p.add_argument("--layer", type=int, default=None, metavar="K",
                   help="pruning layer K of single-stage inner-LLM methods (ILP, FastV, DART, random-inner; default 2)")
    p.add_argument("--grid", type=int, default=8, metavar="G", help="region grid side (default 8)")
    p.add_argument("--pool", type=int, default=None, metavar="P", help="PLC pooling block outside the region (default 4)")
    add_option_argument(p)
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="T", help="answer length limit (default 16)")
    add_device_arguments(p)
    p.add_argument("--overlay", default=None, metavar="PNG",
                   help="write a PNG with the region (red) and the tokens kept at full resolution (the rest dimmed)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=run)


DEVICE_HELP = ("where the answering model runs: auto (default: cuda if available, else mps, else cpu), cpu, cuda, "
               "cuda:N (the N-th GPU) or mps")
DTYPE_HELP = ("the answering model's parameter dtype: auto (default: bfloat16 on a CUDA GPU that supports it, else "
              "float32), float32, bfloat16 or float16")
ATTN_HELP = ("attention implementation: sdpa (default), eager, or flash_attention_2 (CUDA, bfloat16/float16 and the "
             "flash-attn package)")
DEVICE_MAP_HELP = ("'auto': let accelerate spread the answering model over the visible GPUs (then the CPU), for "
                   "checkpoints too large for one GPU; --device must stay auto")
LOCALIZER_DEVICE_HELP = ("where a generative localizer VLM runs (same words as --device; default: the answerer's "
                         "device); its dtype is auto there")


def add_device_arguments(parser: argparse.ArgumentParser, localizer: bool = True) -> None:
    """Add ``--device``, ``--dtype``, ``--attn``, ``--device-map`` (and ``--localizer-device``), shared by subcommands.

    Args:
        parser: the subcommand's parser.
        localizer: also add ``--localizer-device``.
    """
    group = parser.add_argument_group("devices and precision")
    group.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}", help=DEVICE_HELP)
    group.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"), help=DTYPE_HELP)
    group.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"), help=ATTN_HELP)
    group.add_argument("--device-map", default=None, choices=("auto",), help=DEVICE_MAP_HELP)
    if localizer:
        group.add_argument("--localizer-device", default=None, metavar="{auto,cpu,cuda,cuda:N,mps}",
                           help=LOCALIZER_DEVICE_HELP)


def device_settings(args: argparse.Namespace) -> tuple[dict, str]:
    """Check the device flags before any model loads; ``(load_model keyword arguments, localizer device)``.

    Raises:
        CropInputError: for a device this machine does not have, a dtype it cannot run there,
            flash attention without its requirements, or ``--device-map`` with an explicit ``--device``.
    """
    from crop.models.loading import check_attention, resolve_device, resolve_dtype

    device_map = getattr(args, "device_map", None)
    if device_map is not None and args.device.strip().lower() != "auto":
        raise CropInputError(f"--device-map {device_map} places the model itself: leave --device at auto "
                             f"(got --device {args.device})")
    device = resolve_device(args.device)
    check_attention(args.attn, device, resolve_dtype(args.dtype, device))
    localizer_device = getattr(args, "localizer_device", None)
    localizer_device = str(device) if localizer_device is None else str(resolve_device(localizer_device))
    kwargs = {"attn_implementation": args.attn, "device": args.device, "dtype": args.dtype, "device_map": device_map}
    return kwargs, localizer_device


def device_report(model, localizer, args: argparse.Namespace) -> dict:
    """For the results file: where the answerer (and a VLM localizer) ran, its dtype and attention, the GPUs' names."""
    import torch

    from crop.models.loading import input_device

    out = {"answerer": str(input_device(model)), "dtype": str(model.dtype).removeprefix("torch."),
           "attn": args.attn, "device_map": args.device_map}
    if args.device_map is not None:
        out["answerer_map"] = sorted({str(p.device) for p in model.parameters()})
    if getattr(localizer, "model", None) is not None:
        out["localizer"] = str(input_device(localizer.model))
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def _config(args: argparse.Namespace):
    """The method's config from the flags, through the one builder (:func:`crop.methods.build_config`)."""
    from crop.methods import Option, build_config

    if args.keep_tokens is not None and args.keep_tokens <= 0:
        raise CropInputError(f"--keep-tokens must be a positive integer, got {args.keep_tokens}")
    flags = [Option(name, value, source=f"--{name}") for name, value in (("layer", args.layer), ("pool", args.pool))
             if value is not None]
    try:
        return build_config(args.method, args.keep_tokens, [*flags, *parse_options(args.option)],
                            shared={"grid": args.grid})
    except ValueError as exc:
        raise CropInputError(str(exc)) from None


def _image_source(args: argparse.Namespace) -> Path | str:
    from crop.io import sample_image_path

    if args.sample and args.image is not None:
        raise CropInputError(f"give either IMAGE ({args.image}) or --sample, not both")
    if args.sample:
        path = sample_image_path()
        if not path.is_file():
            raise CropInputError(f"the sample image is missing from the installed package: {path}")
        return path
    if args.image is None:
        raise CropInputError("no image: give IMAGE before the question, or --sample for the shipped sample image")
    return args.image


def _check_overlay_path(path: str) -> None:
    """Refuse an --overlay path that could not be written, before any inference is spent on it."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise CropInputError(f"--overlay must be a .png file, got {path}")
    if target.is_dir():
        raise CropInputError(f"--overlay {path} is a folder; give a file name ending in .png")
    folder = target.parent
    if not folder.is_dir():
        raise CropInputError(f"cannot write --overlay {path}: the folder {folder} does not exist")
    try:  # os.access says yes to root and knows nothing of read-only mounts: try it
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        raise CropInputError(f"cannot write --overlay {path}: the folder {folder} is not writable") from None
    if target.exists() and not os.access(target, os.W_OK):
        raise CropInputError(f"cannot write --overlay {path}: the file exists and is not writable")


def run(args: argparse.Namespace) -> int:
    """Run ``crop answer``; returns the exit code."""
    from crop.io import check_question, load_image

    # cheap checks first: bad input fails in a fraction of a second, before torch or any model loads
    if args.max_image_pixels is not None and args.max_image_pixels < 1:
        raise CropInputError(f"--max-image-pixels must be a positive integer, got {args.max_image_pixels}")
    image = load_image(_image_source(args), max_pixels=args.max_image_pixels)
    question = check_question(args.question)
    if args.max_new_tokens < 1:
        raise CropInputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.overlay:
        _check_overlay_path(args.overlay)
    config = _config(args)
    load_kwargs, localizer_device = device_settings(args)

    from crop.localizers import make_localizer
    from crop.models.loading import load_model
    from crop.models.tiny import TINY_MODEL_NAMES
    from crop.pipeline import CropPipeline
    from crop.viz import pooled_block

    model, processor = load_model(args.model, **load_kwargs)
    localizer = make_localizer(args.localizer or ("embedded" if args.model == "embedded" else "full"), args.grid,
                               device=localizer_device)
    try:
        pipeline = CropPipeline(model, processor, localizer, config)
    except ValueError as exc:
        raise CropInputError(str(exc)) from None
    try:
        result = pipeline(image, question, max_new_tokens=args.max_new_tokens)
    except ValueError as exc:  # e.g. a PLC budget below the pooled context of this image's token grid
        raise CropInputError(str(exc)) from None
    if args.overlay:
        panels = pipeline.adapter.overlay_panels(image, getattr(processor, "image_processor", None),
                                                 (result.token_grid[0], result.token_grid[1]))
        _write_overlay(args.overlay, panels, result, args.grid, pooled_block(config))
    note = None
    if args.model in TINY_MODEL_NAMES:
        note = f"{args.model} has random weights: its answer is gibberish by design (use it for smoke tests)"
    if args.json:
        payload = result.to_dict()
        if note:
            payload["note"] = note
        print(json.dumps(payload))
        return 0
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(_report(result))
    return 0


def _write_overlay(path: str, panels, result, grid: int, pool: int | None = None) -> None:
    """Save the region + kept-token drawing for ``result`` over ``panels``, what the model's tokens cover."""
    from crop.regions import GridBox
    from crop.viz import draw_panels

    box = result.extra.get("model_view_box", result.box)  # the region where the model sees it
    x0, y0, x1, y1 = box
    picture = draw_panels(panels, GridBox(x0, y0, x1, y1, grid=grid), result.full_resolution_tokens, pool=pool)
    try:
        picture.save(path)
    except (OSError, ValueError) as exc:
        raise CropInputError(f"cannot write --overlay {path}: {exc}") from None


def _region_line(result) -> str:
    """The region the model's tokens were actually selected with, and how it came from the localizer's."""
    used = result.extra.get("model_view_box")
    line = f"region: {used or result.box} on a {result.grid}x{result.grid} grid"
    if result.extra.get("self_localized"):
        return line + (f" of the model's view, found by the answerer's own attention before layer {result.layer} "
                       "(CROP-self, no localizer model)")
    if used is not None and list(used) != list(result.box):
        line += (f" of the model's view (the localizer's box {result.box} on the whole image, mapped onto the "
                 "padded / centre-cropped picture the model sees)")
    if result.localizer_fallback:
        line += "  (localizer output unusable: full image used)"
    return line


def _report(result) -> str:
    """A short human-readable report of one answer."""
    kept = ", ".join(f"{stage}: {n}" for stage, n in result.visual_tokens_kept.items())
    t = result.timings
    lines = [
        f"answer: {result.answer}",
        _region_line(result),
        f"method: {result.method}" + (f" (layer {result.layer})" if result.layer is not None else "")
        + (f", keep_tokens {result.keep_tokens}" if result.keep_tokens is not None else ""),
        f"visual tokens: {result.visual_tokens_in} in; kept {kept}",
        f"KV cache after prefill: {result.kv_cache_bytes / 1024:.1f} KiB, lengths per layer {result.kv_cache_lengths}",
        f"time: localizer {t['localizer_s'] * 1000:.0f} ms + prefill {t['prefill_s'] * 1000:.0f} ms "
        f"+ decode {t['decode_s'] * 1000:.0f} ms = {t['total_s'] * 1000:.0f} ms",
    ]
    return "\n".join(lines)
