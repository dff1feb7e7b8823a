"""Render an evaluation's ``results.json`` as a markdown table and an accuracy-vs-tokens plot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def markdown_table(results: dict[str, Any]) -> str:
    """One row per method x budget: accuracy, kept vs full, per family, tokens, speed-ups."""
    runs = results["runs"]
    families = sorted({f for r in runs for f in r["accuracy_per_family"]})
    n_vis = results["visual_tokens_per_image"]
    head = ["method", "budget (of 576)", f"tokens kept, last stage (of {n_vis})", "equivalent tokens", "accuracy",
            "kept vs full",
            *families, "prefill speed-up", "end-to-end speed-up (incl. localizer)", "localizer share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        kept = r["visual_tokens_kept"]
        tokens = min(kept.values()) if kept else n_vis
        cells = [r["method"], "-" if r["keep_tokens_576"] is None else str(r["keep_tokens_576"]), f"{tokens:.1f}",
                 f"{r['equivalent_tokens']:.1f}", f"{100 * r['accuracy']:.1f}%", f"{100 * r['accuracy_kept']:.1f}%",
                 *[f"{100 * r['accuracy_per_family'].get(f, float('nan')):.1f}%" for f in families],
                 f"{r['prefill_speedup']:.2f}x", f"{r['e2e_speedup_with_localizer']:.2f}x",
                 f"{100 * r['localizer_share_of_e2e']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    loc = results["localization"]["all"]
    bench = results["benchmark"]
    lines += ["", f"Benchmark: synth/{bench['split']}, n={bench['n']}, seed={bench['seed']}; model: {results['model']}; "
              f"localizer: {results['localizer']} (mean IoU {loc['mean_iou']:.3f}, contains GT {100 * loc['contains_gt']:.1f}%, "
              f"fallbacks {loc.get('fallbacks', 0)}). Speed-ups are ratios of medians vs full, measured in one process."]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or ``None`` (with a warning) if it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'crop-vlm[eval]'); skipping the plot")
        return None
    return plt


def plot_accuracy_vs_tokens(results: dict[str, Any], path: str | Path) -> Path | None:
    """Accuracy against equivalent visual tokens (the compute-fair axis), one line per method.

    Returns ``None`` if matplotlib is missing.
    """
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in results["runs"]:
        by_method.setdefault(r["method"], []).append((r["equivalent_tokens"], 100 * r["accuracy"]))
    for method, points in by_method.items():
        points.sort()
        xs, ys = zip(*points, strict=True)
        if method == "full":
            ax.axhline(ys[0], color="gray", linestyle="--", label=f"full ({int(xs[0])} tokens)")
        else:
            ax.plot(xs, ys, marker="o", label=method)
    ax.set_xlabel("equivalent visual tokens per image (layer-weighted average)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"synth/{results['benchmark']['split']} (n={results['benchmark']['n']}), localizer: {results['localizer']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
