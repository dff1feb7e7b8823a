"""Render ``crop bench`` results: a markdown table per batch size and a time-breakdown PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crop.eval.report import pyplot


def _ms(row: dict[str, Any], key: str) -> str:
    t = row["timings"][key]
    return f"{1000 * t['median']:.0f} ({1000 * t['min']:.0f}-{1000 * t['max']:.0f})"


def _last_stage(row: dict[str, Any]) -> tuple[int | None, list[int]]:
    """The pruning layer (``None`` before the LLM) and the visual tokens kept at the last stage."""
    kept = row["visual_tokens_kept"]
    stages = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in kept.items() if k.startswith("after_layer_"))
    return (stages[-1][0], stages[-1][1]) if stages else (None, kept["llm_input"])


def interpolated_share(block: dict[str, Any], name: str) -> float | None:
    """For a single-stage inner-LLM case: its measured prefill speed-up as a share of the speed-up
    predicted from *measured* times, layer by layer: ``K/N`` of the full prefill plus ``(N-K)/N``
    of the ideal prefill at the same budget. 100% means the hooks add no cost of their own.
    """
    row = block["cases"][name]
    ideal = block["cases"].get(f"ideal@{row['keep_tokens_576']}")
    stages = [k for k in row["visual_tokens_kept"] if k.startswith("after_layer_")]
    if ideal is None or len(stages) != 1:
        return None
    layer = int(stages[0].rsplit("_", 1)[1])
    layers = len(block["cases"]["full"]["kv_cache_lengths"])
    full_t = block["cases"]["full"]["timings"]["prefill_s"]["median"]
    predicted = (layer * full_t + (layers - layer) * ideal["timings"]["prefill_s"]["median"]) / layers
    return predicted / row["timings"]["prefill_s"]["median"]


def bench_table(results: dict[str, Any]) -> str:
    """Markdown: per batch size, a prefill/decode table and an end-to-end/memory table (medians, min-max)."""
    speed_head = ["case", "visual tokens kept (last stage)", "equivalent tokens", "LLM prefill ms", "prefill speed-up",
                  "analytic (FLOPs)", "share of analytic", "share of layer-interpolated", "share of ideal",
                  "decode ms/token", "decode ratio"]
    cost_head = ["case", "vision ms", "localizer ms", "select/compress ms", "end-to-end ms", "e2e speed-up",
                 "localizer share", "KV bytes", "KV / analytic", "throughput /s"]
    lines = [f"Model: {results['model']}; localizer: {results['localizer']}; repeats: {results['spec']['repeats']} "
             f"(medians, min-max in brackets); {results['spec']['new_tokens']} new tokens; "
             f"{results['machine']['threads']} threads; {results['machine']['platform']}.", ""]
    for block in results["batches"]:
        speed = ["| " + " | ".join(speed_head) + " |", "|" + "---|" * len(speed_head)]
        cost = ["| " + " | ".join(cost_head) + " |", "|" + "---|" * len(cost_head)]
        for name, row in block["cases"].items():
            _, last = _last_stage(row)
            share_ideal = row.get("prefill_share_of_ideal")
            equiv = row.get("equivalent_tokens")
            interp = interpolated_share(block, name)
            speed.append("| " + " | ".join([
                name, str(last[0] if len(set(last)) == 1 else last),
                "-" if not equiv else f"{sum(equiv) / len(equiv):.1f}", _ms(row, "prefill_s"),
                f"{row['prefill_speedup']:.2f}x", f"{row['prefill_speedup_analytic']:.2f}x",
                f"{100 * row['share_of_analytic']:.0f}%", "-" if interp is None else f"{100 * interp:.0f}%",
                "-" if share_ideal is None or row["method"] == "ideal" else f"{100 * share_ideal:.0f}%",
                _ms(row, "decode_s_per_token"), f"{row['decode_ratio']:.2f}"]) + " |")
            cost.append("| " + " | ".join([
                name, _ms(row, "vision_s"), _ms(row, "localizer_s"), _ms(row, "prepare_s"), _ms(row, "end_to_end_s"),
                f"{row['end_to_end_speedup']:.2f}x", f"{100 * row['localizer_share_of_e2e']:.0f}%",
                f"{row['kv_cache_bytes'] / 2**20:.1f} MiB", f"{row['kv_vs_analytic']:.3f}",
                f"{row['throughput_per_s']:.2f}"]) + " |")
        lines += [f"**batch {block['batch']}** ({block['visual_tokens_per_image']} visual tokens per image): prefill "
                  "and decode", "", *speed, "", f"**batch {block['batch']}**: end to end (localizer included for "
                  "CROP) and memory", "", *cost, ""]
        lines += _self_cost_lines(block)
    return "\n".join(lines)


def _self_cost_lines(block: dict[str, Any]) -> list[str]:
    """CROP-self's localization cost (its captured attention rows) as a share of the full prefill, if it ran."""
    rows = [(name, row["self_localization_cost"]) for name, row in block["cases"].items()
            if "self_localization_cost" in row]
    if not rows:
        return []
    out = [f"**batch {block['batch']}**: CROP-self's localization cost, as a share of the full model's prefill "
           "(measured: its prefill minus CROP-ILP's at the same budget, paired per repeat; analytic: its selection "
           "FLOPs)", "", "| case | measured (median, min-max) | analytic |", "|---|---|---|"]
    for name, cost in rows:
        m = cost["measured_share_of_full_prefill"]
        measured = "- (needs crop-ilp at the same budget)" if m is None else \
            f"{100 * m['median']:.1f}% ({100 * m['min']:.1f} to {100 * m['max']:.1f})"
        out.append(f"| {name} | {measured} | {100 * cost['analytic_share_of_full_prefill']:.3f}% |")
    return out + [""]


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
