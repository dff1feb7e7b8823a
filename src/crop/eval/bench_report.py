"""Render ``crop bench`` results: a markdown table per batch size and a time-breakdown PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crop.eval.report import pyplot


def _ms(row: dict[str, Any], key: str) -> str:
    t = row["timings"][key]
    return f"{1000 * t['median']:.0f} ({1000 * t['min']:.0f}-{1000 * t['max']:.0f})"


def bench_table(results: dict[str, Any]) -> str:
    """Markdown: per batch size, one row per case with medians (min-max) and ratios vs full."""
    head = ["case", "visual tokens kept (last stage)", "equivalent tokens", "vision ms", "localizer ms", "select/compress ms", "LLM prefill ms",
            "prefill speed-up", "analytic", "share of analytic", "share of ideal", "decode ms/token", "decode ratio",
            "end-to-end ms", "e2e speed-up", "localizer share", "KV bytes", "KV / analytic", "throughput /s"]
    lines = [f"Model: {results['model']}; localizer: {results['localizer']}; repeats: {results['spec']['repeats']} "
             f"(medians, min-max in brackets); {results['spec']['new_tokens']} new tokens; "
             f"{results['machine']['threads']} threads; {results['machine']['platform']}.", ""]
    for block in results["batches"]:
        lines += [f"**batch {block['batch']}** ({block['visual_tokens_per_image']} visual tokens per image)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, row in block["cases"].items():
            kept = row["visual_tokens_kept"]
            last = kept.get(next((k for k in kept if k.startswith("after_layer")), "llm_input"))
            share_ideal = row.get("prefill_share_of_ideal")
            equiv = row.get("equivalent_tokens")
            equiv_text = "-" if not equiv else f"{sum(equiv) / len(equiv):.1f}"
            cells = [name, str(last[0] if len(set(last)) == 1 else last), equiv_text, _ms(row, "vision_s"),
                     _ms(row, "localizer_s"), _ms(row, "prepare_s"), _ms(row, "prefill_s"),
                     f"{row['prefill_speedup']:.2f}x", f"{row['prefill_speedup_analytic']:.2f}x",
                     f"{100 * row['share_of_analytic']:.0f}%",
                     "-" if share_ideal is None or row["method"] == "ideal" else f"{100 * share_ideal:.0f}%",
                     _ms(row, "decode_s_per_token"), f"{row['decode_ratio']:.2f}", _ms(row, "end_to_end_s"),
                     f"{row['end_to_end_speedup']:.2f}x", f"{100 * row['localizer_share_of_e2e']:.0f}%",
                     f"{row['kv_cache_bytes'] / 2**20:.1f} MiB", f"{row['kv_vs_analytic']:.3f}",
                     f"{row['throughput_per_s']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_breakdown(results: dict[str, Any], path: str | Path) -> Path | None:
    """Stacked bars of the median time per component, per case, for the first batch size."""
    plt = pyplot()
    if plt is None:
        return None
    block = results["batches"][0]
    names = list(block["cases"])
    parts = [("vision_s", "vision"), ("localizer_s", "localizer"), ("prepare_s", "select/compress"),
             ("prefill_s", "LLM prefill")]
    n_decode = results["spec"]["new_tokens"] - 1
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
    bottom = [0.0] * len(names)
    for key, label in parts + [("decode_s_per_token", f"decode ({n_decode} tokens)")]:
        scale = n_decode if key == "decode_s_per_token" else 1
        vals = [block["cases"][n]["timings"][key]["median"] * scale for n in names]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"{results['model']}, batch {block['batch']}")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
