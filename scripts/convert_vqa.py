"""Convert a TextVQA- or GQA-style annotation file to the JSONL that ``crop eval --data`` reads.

Usage::

    python scripts/convert_vqa.py TextVQA_0.5.1_val.json --images train_images --out textvqa_val.jsonl
    python scripts/convert_vqa.py val_balanced_questions.json --images gqa/images --out gqa_val.jsonl --limit 1000

Input formats (``--format auto`` tells them apart):

- **TextVQA style**: ``{"data": [{"question_id", "question", "image_id", "answers": [...]}, ...]}``
  (also a bare list of such records); the family is ``"textvqa"`` unless a record has
  ``question_type`` / ``answer_type``;
- **GQA style**: ``{question_id: {"imageId", "question", "answer", "types": {"structural": ...}}}``;
  the family is the question's structural type (``verify``, ``query``, ``choose``, ...).

Each output line is ``{"id", "image", "question", "answers", "family"}``; ``image`` is
``<images>/<image id><ext>``, written relative to the output file's folder when it can be
(so the folder can move as a whole). Neither format carries a question's region, so the
oracle localizer cannot be used on the result. Images that do not exist are an error unless
``--skip-missing`` drops their questions. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMATS = ("auto", "textvqa", "gqa")


def detect_format(annotations: Any) -> str:
    """``"textvqa"`` or ``"gqa"`` for a loaded annotation file.

    Raises:
        ValueError: if it looks like neither.
    """
    if isinstance(annotations, list) or (isinstance(annotations, dict) and isinstance(annotations.get("data"), list)):
        return "textvqa"
    if isinstance(annotations, dict) and annotations:
        first = next(iter(annotations.values()))
        if isinstance(first, dict) and "imageId" in first:
            return "gqa"
    raise ValueError("neither TextVQA style ({'data': [...]} with image_id/question/answers) nor GQA style "
                     "({question id: {imageId, question, answer}})")


def _textvqa(annotations: Any) -> Iterator[dict[str, Any]]:
    rows = annotations["data"] if isinstance(annotations, dict) else annotations
    for i, row in enumerate(rows):
        try:
            answers = row["answers"]
            yield {"id": str(row.get("question_id", i)), "image_id": str(row["image_id"]), "question": row["question"],
                   "answers": [answers] if isinstance(answers, str) else list(answers),
                   "family": str(row.get("question_type") or row.get("answer_type") or "textvqa")}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"record {i}: missing field {exc}") from None


def _gqa(annotations: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for qid, row in annotations.items():
        try:
            types = row.get("types") or {}
            yield {"id": str(qid), "image_id": str(row["imageId"]), "question": row["question"],
                   "answers": [row["answer"]], "family": str(types.get("structural") or "gqa")}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"question {qid}: missing field {exc}") from None


def convert(annotations_path: str | Path, images: str | Path, out: str | Path, fmt: str = "auto", ext: str = ".jpg",
            limit: int | None = None, skip_missing: bool = False) -> dict[str, int]:
    """Write the JSONL for ``crop eval --data`` from an annotation file.

    Args:
        annotations_path: the TextVQA- or GQA-style JSON file.
        images: the folder holding the images, named ``<image id><ext>``.
        out: the JSONL file to write.
        fmt: ``"auto"``, ``"textvqa"`` or ``"gqa"``.
        ext: the images' file extension.
        limit: write at most this many questions (in file order).
        skip_missing: drop questions whose image is missing instead of failing.

    Returns:
        ``{"written": n, "skipped": m}``.

    Raises:
        ValueError: for an unreadable or unrecognised file, a record without the needed
            fields, or a missing image (without ``skip_missing``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    try:
        annotations = json.loads(Path(annotations_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {annotations_path}: {exc}") from None
    fmt = detect_format(annotations) if fmt == "auto" else fmt
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise ValueError(f"image folder not found: {images}")
    records = _textvqa(annotations) if fmt == "textvqa" else _gqa(annotations)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    lines = []
    for record in records:
        if limit is not None and written >= limit:
            break
        image = images / f"{record.pop('image_id')}{ext}"
        if not image.is_file():
            if not skip_missing:
                raise ValueError(f"image of question {record['id']} not found: {image} (--skip-missing drops such "
                                 "questions)")
            skipped += 1
            continue
        lines.append(json.dumps({"id": record["id"], "image": _relative(image, out.parent), **record}))
        written += 1
    if not written:
        raise ValueError(f"no question written ({skipped} skipped for missing images)")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"written": written, "skipped": skipped}


def _relative(image: Path, folder: Path) -> str:
    """``image`` relative to ``folder`` if they share a drive, else absolute."""
    try:
        return os.path.relpath(image.resolve(), folder.resolve())
    except ValueError:  # another drive (Windows)
        return str(image.resolve())


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code (2 with a one-line error on bad input)."""
    parser = argparse.ArgumentParser(prog="convert_vqa", description=__doc__.split("\n\n")[0])
    parser.add_argument("annotations", help="TextVQA- or GQA-style annotation JSON file")
    parser.add_argument("--images", required=True, help="folder of the images, named <image id><ext>")
    parser.add_argument("--out", required=True, help="the JSONL file to write")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: detect it)")
    parser.add_argument("--ext", default=".jpg", help="image file extension (default .jpg)")
    parser.add_argument("--limit", type=int, default=None, help="write at most N questions")
    parser.add_argument("--skip-missing", action="store_true", help="drop questions whose image is missing")
    args = parser.parse_args(argv)
    try:
        counts = convert(args.annotations, args.images, args.out, args.format, args.ext, args.limit, args.skip_missing)
    except ValueError as exc:
        print(f"convert_vqa: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {counts['written']} questions to {args.out}" +
          (f" ({counts['skipped']} skipped: image missing)" if counts["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
