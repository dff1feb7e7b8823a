"""``crop synth``: write a split of the synthetic localized-VQA benchmark (PNGs + one JSONL)."""

from __future__ import annotations

import argparse


def _range(kind):
    def parse(text: str):
        parts = text.replace(":", ",").split(",")
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {text!r}")
        try:
            return kind(parts[0]), kind(parts[1])
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected MIN,MAX numbers, got {text!r}") from exc

    return parse


def register(subparsers) -> None:
    """Add the ``synth`` subcommand to ``subparsers``."""
    from crop.data.synth import BACKGROUNDS, SPLITS

    p = subparsers.add_parser(
        "synth",
        help="generate the synthetic localized-VQA benchmark",
        description="Write N seeded samples of one split: OUT/<split>/images/*.png, OUT/<split>.jsonl "
        "(id, image, question, answer, family, box_px, box_grid) and OUT/<split>.meta.json. "
        "The same arguments give byte-identical files; each split has its own random stream, and the "
        "test split defaults to denser scenes of smaller objects.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--n", type=int, default=200, help="number of samples (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objects", type=_range(int), default=None, metavar="MIN,MAX",
                   help="objects per scene (default 6,16; test 12,16)")
    p.add_argument("--object-size", type=_range(int), default=None, metavar="MIN,MAX",
                   help="object side in pixels (default 32,52 at 336 px; test 30,46)")
    p.add_argument("--background", default=None, metavar="NAMES",
                   help=f"comma-separated background textures from {','.join(BACKGROUNDS)} (default all)")
    p.add_argument("--image-size", type=int, default=336, help="image side in pixels (default 336)")
    p.add_argument("--lmms-task", action="store_true",
                   help="also write the lmms-eval task crop_synth next to the split (crop_synth.yaml + "
                        "crop_synth_utils.py), for: python -m lmms_eval --model crop --tasks crop_synth "
                        "--include_path OUT")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the split described by ``args``; print the JSONL path."""
    from tqdm import tqdm

    from crop.data.synth import default_config, write_split
    from crop.errors import CropInputError

    if args.n < 1:
        raise CropInputError(f"--n must be >= 1, got {args.n}")
    overrides: dict = {"image_size": args.image_size}
    if args.objects is not None:
        overrides["n_objects"] = args.objects
    if args.object_size is not None:
        overrides["object_scale"] = (args.object_size[0] / args.image_size, args.object_size[1] / args.image_size)
    if args.background is not None:
        overrides["backgrounds"] = tuple(b.strip() for b in args.background.split(",") if b.strip())
    try:
        config = default_config(args.split, **overrides)
    except ValueError as exc:
        raise CropInputError(str(exc)) from exc
    with tqdm(total=args.n, desc=f"synth {args.split}", unit="img", disable=args.no_progress) as bar:
        path = write_split(args.out, args.split, args.n, args.seed, config, progress=bar.update)
    if args.lmms_task:
        write_lmms_task(path)
    print(path)
    return 0


def write_lmms_task(jsonl) -> list:
    """Copy the ``crop_synth`` lmms-eval task next to ``jsonl``, reading that file as its test split.

    Returns:
        The paths written (the task YAML, then its document functions).
    """
    import shutil
    from pathlib import Path

    from crop.lmms import TASKS_DIR

    jsonl = Path(jsonl)
    yaml_text = (TASKS_DIR / "crop_synth.yaml").read_text(encoding="utf-8")
    yaml_path = jsonl.parent / "crop_synth.yaml"
    yaml_path.write_text(yaml_text.replace("test: test.jsonl", f"test: {jsonl.name}"), encoding="utf-8")
    utils_path = Path(shutil.copyfile(TASKS_DIR / "crop_synth_utils.py", jsonl.parent / "crop_synth_utils.py"))
    return [yaml_path, utils_path]
