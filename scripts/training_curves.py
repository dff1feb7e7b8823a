"""Training curves of `crop -v train ...` runs, from their logs, as one JSON file and one plot.

Usage: .venv/bin/python scripts/training_curves.py OUT_DIR NAME=LOG [NAME=LOG ...]

Reads the ``step N lr ... ans X ...`` lines (every 50 steps) and the ``val @ N: {...}`` lines
(teacher-forced exact match on the validation batch, per family) that ``crop -v train`` logs,
and writes OUT_DIR/curves.json and OUT_DIR/curves.png (answer loss and validation accuracy
against steps, one line per run).
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

STEP = re.compile(r"step (\d+) lr (\S+) gnorm \S+ ans (\S+)")
VAL = re.compile(r"val @ (\d+): (\{.*\})")


def parse(log: str) -> dict:
    """``{"loss": [[step, lr, ans], ...], "val": [[step, {metric: value}], ...]}`` of one log."""
    loss, val = [], []
    for line in Path(log).read_text(encoding="utf-8", errors="replace").splitlines():
        if m := STEP.search(line):
            loss.append([int(m[1]), float(m[2]), float(m[3])])
        elif m := VAL.search(line):
            val.append([int(m[1]), ast.literal_eval(m[2])])
    return {"loss": loss, "val": val}


def main(out: str, runs: list[str]) -> None:
    curves = {}
    for item in runs:
        name, _, log = item.partition("=")
        curves[name] = parse(log)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "curves.json").write_text(json.dumps(curves, indent=1) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, c in curves.items():
        if c["loss"]:
            a.plot([x[0] for x in c["loss"]], [x[2] for x in c["loss"]], label=name)
        if c["val"]:
            b.plot([x[0] for x in c["val"]], [100 * x[1]["acc"] for x in c["val"]], marker="o", label=name)
    a.set_xlabel("step")
    a.set_ylabel("answer-token loss (running mean)")
    b.set_xlabel("step")
    b.set_ylabel("validation exact match (%)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=110)
    print(f"wrote {folder / 'curves.json'} and {folder / 'curves.png'}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
