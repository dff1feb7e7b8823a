"""Fill the generated blocks of the README and the docs from the results files, or check they are current.

Usage:
    .venv/bin/python scripts/docs_tables.py --write          # regenerate every block in place
    .venv/bin/python scripts/docs_tables.py --check          # exit 1 and name each stale block (tests, CI)
    .venv/bin/python scripts/docs_tables.py --check FILE.md  # only these files

A block is the text between two HTML comments (invisible on GitHub and in the docs site)::

    <!-- generated: matched results/eval-matched-equivalent/results.json -->
    ...the table, written by this script...
    <!-- /generated -->

The first word after ``generated:`` names the generator, the rest are its arguments:

- ``label``, ``matched``, ``families``, ``variants``, ``compare``: ``scripts/readme_accuracy_table.py``'s
  tables of ``crop eval`` results (same arguments);
- ``k_study K1.json K2.json K3.json``: ``scripts/k_study_table.py``'s table;
- ``include PATH``: a file some command wrote (``bench.md``, a study's table), verbatim, minus its
  first ``# `` title line.

Numbers in the README and the docs come only from such blocks (or the generated results pages),
so no number is typed by hand and none goes stale without ``--check`` failing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- generated: (?P<spec>[^\n]*?) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S)


def _script(name: str):
    """Import ``scripts/NAME.py`` as a module (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _in_root():
    """Run with the repo root as the working directory (the specs' paths are relative to it)."""
    before = Path.cwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(before)


def _printed(function: Callable[..., None], *args: str) -> str:
    """What ``function(*args)`` prints (the table scripts print their tables)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        function(*args)
    return out.getvalue()


def _include(path: str) -> str:
    text = (ROOT / path).read_text(encoding="utf-8")
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip() + "\n"


def render(spec: str) -> str:
    """The body of a block whose opening comment says ``generated: SPEC`` (paths relative to the repo root)."""
    kind, *args = spec.split()
    tables = _script("readme_accuracy_table")
    if kind in ("label", "matched", "families", "variants", "compare"):
        with _in_root():
            return _printed(getattr(tables, kind), *args).strip() + "\n"
    if kind == "k_study":
        with _in_root():
            return _printed(_script("k_study_table").main, list(args)).strip() + "\n"
    if kind == "include" and len(args) == 1:
        return _include(args[0])
    raise ValueError(f"unknown generated block {spec!r}: expected one of label, matched, families, variants, "
                     "compare, k_study, include PATH")


def refresh(text: str) -> str:
    """``text`` with every generated block's body replaced by what its generator writes now."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("spec")) + m.group(4), text)


def stale_blocks(path: Path) -> list[str]:
    """The specs of the blocks in ``path`` whose bodies differ from what their generators write now."""
    text = path.read_text(encoding="utf-8")
    return [m.group("spec") for m in BLOCK.finditer(text) if m.group("body") != render(m.group("spec"))]


def default_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate every block in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if a block differs from what it would be now")
    parser.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md and docs/**/*.md)")
    args = parser.parse_args(argv)
    files = args.files or default_files()
    problems = 0
    for path in files:
        if args.write:
            text = path.read_text(encoding="utf-8")
            new = refresh(text)
            if new != text:
                path.write_text(new, encoding="utf-8")
                print(f"updated {path}")
        else:
            for spec in stale_blocks(path):
                problems += 1
                print(f"{path}: stale block 'generated: {spec}' (run scripts/docs_tables.py --write)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
