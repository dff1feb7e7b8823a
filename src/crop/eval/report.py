"""Render an evaluation's ``results.json`` as a markdown table and an accuracy-vs-tokens plot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def markdown_table(results: dict[str, Any]) -> str:
    """One row per method x budget: accuracy, kept vs full, per family, tokens per stage, equivalent tokens, GFLOPs.

    A budget a method cannot meet under the run's matching says so in its row (no accuracy).
    """
    runs = results["runs"]
    families = sorted({f for r in runs for f in r.get("accuracy_per_family", {})})
    n_vis = results["visual_tokens_per_image"]
    match = results.get("spec", {}).get("match", "label")
    head = ["method", "budget (of 576)", "budget argument", f"tokens kept, last stage (of {n_vis})",
            "equivalent tokens", "prefill GFLOPs (LLM + selection + localizer)", "accuracy", "kept vs full",
            *families]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        label = "-" if r["keep_tokens_576"] is None else str(r["keep_tokens_576"])
        argument = "-" if r.get("keep_tokens") is None else str(r["keep_tokens"])
        if "infeasible" in r:
            lines.append("| " + " | ".join([r["method"], label, argument, f"infeasible: {r['infeasible']}"]
                                           + [""] * (len(head) - 4)) + " |")
            continue
        kept = r["visual_tokens_kept"]
        tokens = min(kept.values()) if kept else n_vis
        g = r["gflops"]
        cells = [r["method"], label, argument, f"{tokens:.1f}", f"{r['equivalent_tokens']:.1f}",
                 f"{g['total']:.3f} ({g['llm_prefill']:.3f} + {g['selection']:.4f} + {g['localizer']:.3f})",
                 f"{100 * r['accuracy']:.1f}%", f"{100 * r['accuracy_kept']:.1f}%",
                 *[f"{100 * r['accuracy_per_family'].get(f, float('nan')):.1f}%" for f in families]]
        lines.append("| " + " | ".join(cells) + " |")
    loc = results["localization"]["all"]
    bench = results["benchmark"]
    meaning = {"label": "each method's budget argument is the label scaled to this model's visual tokens, in the "
                        "method's own meaning (tokens after layer K, tokens reaching the LLM, or a layer-weighted "
                        "average), so one label is not one compute",
               "equivalent": "each method's budget argument is solved so that its planned equivalent visual tokens "
                             "(mean over LM layers) equal the label's share of this model's tokens",
               "flops": "each method's budget argument is solved so that its planned prefill FLOPs (LLM + its "
                        "selection + the localizer for region methods) equal an unpruned prefill of the label's "
                        "share of tokens"}[match]
    lines += ["", f"Benchmark: synth/{bench['split']}, n={bench['n']}, seed={bench['seed']}; model: {results['model']}; "
              f"localizer: {results['localizer']} (mean IoU {loc['mean_iou']:.3f}, contains GT {100 * loc['contains_gt']:.1f}%, "
              f"fallbacks {loc.get('fallbacks', 0)}). Matching: {match}: {meaning}. FLOPs are analytic, per sample; "
              "speed is measured by `crop bench`, not here."]
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


def _plot_accuracy(results: dict[str, Any], path: str | Path, x_of, xlabel: str, full_label) -> Path | None:
    """Accuracy against ``x_of(run)``, one line per method (full as a dashed line); ``None`` without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in results["runs"]:
        if "infeasible" not in r:
            by_method.setdefault(r["method"], []).append((x_of(r), 100 * r["accuracy"]))
    for method, points in by_method.items():
        points.sort()
        xs, ys = zip(*points, strict=True)
        if method == "full":
            ax.axhline(ys[0], color="gray", linestyle="--", label=f"full ({full_label(xs[0])})")
        else:
            ax.plot(xs, ys, marker="o", label=method, linewidth=2.5 if method.startswith("crop") else 1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    match = results.get("spec", {}).get("match", "label")
    ax.set_title(f"synth/{results['benchmark']['split']} (n={results['benchmark']['n']}), match: {match}, "
                 f"localizer: {results['localizer']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_tokens(results: dict[str, Any], path: str | Path) -> Path | None:
    """Accuracy against equivalent visual tokens (the layer-weighted average), one line per method.

    Returns ``None`` if matplotlib is missing.
    """
    return _plot_accuracy(results, path, lambda r: r["equivalent_tokens"],
                          "equivalent visual tokens per image (layer-weighted average)", lambda x: f"{int(x)} tokens")


def plot_accuracy_vs_flops(results: dict[str, Any], path: str | Path) -> Path | None:
    """The Pareto chart: accuracy against analytic prefill GFLOPs (selection and localizer included), per method.

    Returns ``None`` if matplotlib is missing.
    """
    return _plot_accuracy(results, path, lambda r: r["gflops"]["total"],
                          "prefill GFLOPs per sample (LLM + selection + localizer), analytic",
                          lambda x: f"{x:.2f} GFLOPs")
