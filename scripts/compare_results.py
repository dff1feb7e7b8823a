"""Compare two folders written by scripts/sample_evals.sh: byte-identical files, the results' git hash aside.

Usage: .venv/bin/python scripts/compare_results.py BEFORE AFTER   (exit code 1 if anything differs)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

GIT = re.compile(rb'"git":\s*("[0-9a-f]*"|null)')


def main(before: Path, after: Path) -> int:
    files = sorted(p.relative_to(before) for p in before.rglob("*") if p.is_file() and p.suffix in (".json", ".md", ".txt"))
    differ = 0
    for rel in files:
        a, b = (before / rel).read_bytes(), (after / rel).read_bytes() if (after / rel).is_file() else None
        same = b is not None and GIT.sub(b'"git":null', a) == GIT.sub(b'"git":null', b)
        differ += not same
        print(f"{'same' if same else 'DIFFERS'}  {rel}")
    print(f"{len(files) - differ} of {len(files)} files identical (git hash aside)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
