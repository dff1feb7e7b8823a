"""Bench the vLLM engine with and without crop's pruning: same checkpoint, many concurrent requests.

Usage (in ``.venv-vllm``, made by ``scripts/setup_vllm.sh``; a quiet machine):
    .venv-vllm/bin/python scripts/bench_vllm.py --out results/vllm-bench
    .venv-vllm/bin/python scripts/bench_vllm.py --requests 8 --repeats 1 --out /tmp/vb   # a quick look

Builds a random LLaVA-1.5-geometry checkpoint (336 px images, 576 visual tokens, CLIP-style tower
and a Llama LM of :data:`BENCH_SHAPE`'s sizes) in vLLM's layout, starts one engine (the CPU wheel,
``--dtype``, prefix caching off so no request reuses another's KV, and the multimodal processor
cache off so a repeated round preprocesses its images again, as distinct images in real traffic would), and sends ``--requests``
requests at once, one distinct synthetic image and question each, per case: ``full`` (no crop
options) and each ``--methods`` entry at ``--keep-tokens`` of 576, with the sample's ground-truth
region as the request's box (the box comes with the request: no localizer runs, and none is
counted). Cases are interleaved, one warm-up round first, ``--repeats`` measured rounds. Per case:

- **prefill round**: wall time of all requests with ``max_tokens=1`` (vision tower + LLM prefill +
  one sampled token), its speed-up over ``full``, and the FLOPs prediction of that speed-up
  (vision tower + LLM prefill, :mod:`crop.eval.flops`), with the share of it reached;
- **generation round**: wall time with ``--new-tokens`` tokens per request (``ignore_eos``),
  throughput in requests/s and generated tokens/s, and time to first token per request (the
  engine's own ``first_token_latency``), median over requests;
- **KV blocks**: per request ``ceil((prompt + generated) / block_size)`` from the engine's own prompt
  lengths (the placeholders each image got) and block size, summed over requests.

Writes ``OUT/bench.json`` (every reading, the command, git hash, versions) and ``OUT/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the engine starts in seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB

from crop.models.tiny import LlavaShape  # noqa: E402

BENCH_SHAPE = LlavaShape(vision_hidden=256, vision_layers=4, vision_heads=4, vision_intermediate=1024,
                         text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=8, text_intermediate=1408,
                         vocab_size=32000)
"""576 tokens per image into a ~27M-parameter Llama LM: the LLM prefill dominates, as in LLaVA-1.5-7B."""
PROMPT = "USER: <image>\n{q} ASSISTANT:"


def _requests(samples, crop: dict | None, keep: int | None) -> list[dict]:
    out = []
    for s in samples:
        request: dict[str, Any] = {"prompt": PROMPT.format(q=s.question), "multi_modal_data": {"image": s.image}}
        if crop is not None:
            request["mm_processor_kwargs"] = {"crop": {**crop, "keep_tokens": keep, "box": list(s.box_grid)}}
        out.append(request)
    return out


def _round(llm, requests: list[dict], tokens: int) -> tuple[float, list]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(requests, params, use_tqdm=False)
    return time.perf_counter() - start, outs


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _predicted_flops(config, prompt_tokens: int, visual_in_llm: int) -> dict[str, int]:
    """Vision tower and LLM prefill FLOPs of one request whose prompt has ``prompt_tokens`` tokens."""
    from crop.eval.flops import DecoderDims, prefill_flops, vision_flops

    dims = DecoderDims.from_config(config.get_text_config())
    return {"vision": vision_flops(config, 576), "llm_prefill": prefill_flops(dims, [prompt_tokens] * dims.layers),
            "visual_in_llm": visual_in_llm}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoConfig
    from vllm import LLM

    from crop.data.synth import generate
    from crop.eval.provenance import git_hash, machine, versions
    from crop.vllm_plugin.checkpoints import save_vllm_llava

    folder = Path(tempfile.mkdtemp(prefix="crop-vllm-bench-"))
    save_vllm_llava(folder, BENCH_SHAPE)
    config = AutoConfig.from_pretrained(folder)
    llm = LLM(model=str(folder), max_model_len=1024, enforce_eager=True, limit_mm_per_prompt={"image": 1}, seed=0,
              enable_prefix_caching=False, mm_processor_cache_gb=0, max_num_seqs=args.requests,
              disable_log_stats=False, dtype=args.dtype)
    block_size = int(llm.llm_engine.vllm_config.cache_config.block_size)
    batched_tokens = int(llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
    samples = list(generate(args.requests, args.seed, "test"))
    cases: dict[str, tuple[dict | None, int | None]] = {"full": (None, None)}
    for method in args.methods:
        cases[f"{method}@{args.keep_tokens}"] = ({"method": method}, args.keep_tokens)
    readings: dict[str, dict[str, list]] = {name: {"prefill_s": [], "generate_s": [], "ttft_s": []} for name in cases}
    prompts: dict[str, list[int]] = {}
    for repeat in range(args.repeats + 1):  # round 0 warms up
        for name, (crop, keep) in cases.items():
            requests = _requests(samples, crop, keep)
            prefill, outs = _round(llm, requests, 1)
            generated, gen_outs = _round(llm, requests, args.new_tokens)
            prompts[name] = [len(o.prompt_token_ids) for o in outs]
            if repeat == 0:
                continue
            readings[name]["prefill_s"].append(prefill)
            readings[name]["generate_s"].append(generated)
            ttft = [o.metrics.first_token_latency for o in gen_outs if getattr(o, "metrics", None) is not None]
            readings[name]["ttft_s"].append(statistics.median(ttft) if ttft else float("nan"))
        print(f"round {repeat}/{args.repeats} done", file=sys.stderr)
    full_prompt = prompts["full"]
    rows: dict[str, Any] = {}
    for name in cases:
        visual = [576 - (f - p) for f, p in zip(full_prompt, prompts[name], strict=True)]
        flops = [_predicted_flops(config, p, v) for p, v in zip(prompts[name], visual, strict=True)]
        rows[name] = {
            "visual_tokens_in_llm": visual, "prompt_tokens": prompts[name],
            "kv_blocks": sum(math.ceil((p + args.new_tokens) / block_size) for p in prompts[name]),
            "flops": {"vision": sum(f["vision"] for f in flops), "llm_prefill": sum(f["llm_prefill"] for f in flops)},
            "timings": {k: _summary(v) for k, v in readings[name].items()},
        }
    full = rows["full"]
    for row in rows.values():
        t, f = row["timings"], row["flops"]
        row["prefill_speedup"] = full["timings"]["prefill_s"]["median"] / t["prefill_s"]["median"]
        row["predicted_speedup"] = (full["flops"]["vision"] + full["flops"]["llm_prefill"]) / (f["vision"] + f["llm_prefill"])
        row["predicted_llm_only_speedup"] = full["flops"]["llm_prefill"] / f["llm_prefill"]
        row["share_of_predicted"] = row["prefill_speedup"] / row["predicted_speedup"]
        row["requests_per_s"] = args.requests / t["generate_s"]["median"]
        row["tokens_per_s"] = args.requests * args.new_tokens / t["generate_s"]["median"]
        row["throughput_ratio"] = row["requests_per_s"] / (args.requests / full["timings"]["generate_s"]["median"])
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "git": git_hash(), "versions": versions(),
            "vllm": __import__("vllm").__version__, "machine": machine(), "dtype": str(llm.llm_engine.model_config.dtype),
            "block_size": block_size, "max_num_batched_tokens": batched_tokens, "requests": args.requests, "keep_tokens": args.keep_tokens,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "shape": BENCH_SHAPE.__dict__, "cases": rows}


def render(report: dict[str, Any]) -> str:
    """The README table of a report."""
    lines = [f"# vLLM engine: {report['requests']} concurrent requests, {report['keep_tokens']} of 576 visual tokens",
             "",
             "| case | visual tokens in LLM | prefill round | speed-up | predicted (FLOPs) | share | TTFT | "
             "throughput | tokens/s | KV blocks |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in report["cases"].items():
        t = row["timings"]
        p = t["prefill_s"]
        lines.append(
            f"| {name} | {statistics.median(row['visual_tokens_in_llm']):.0f} | {p['median']:.2f} s "
            f"({p['min']:.2f}-{p['max']:.2f}) | {row['prefill_speedup']:.2f}x | {row['predicted_speedup']:.2f}x "
            f"(LLM only {row['predicted_llm_only_speedup']:.2f}x) | {100 * row['share_of_predicted']:.0f}% | "
            f"{t['ttft_s']['median']:.2f} s | {row['requests_per_s']:.2f} req/s ({row['throughput_ratio']:.2f}x) | "
            f"{row['tokens_per_s']:.1f} | {row['kv_blocks']} |")
    lines += ["", f"Medians over {report['repeats']} rounds after a warm-up (min-max in brackets); "
              f"{report['new_tokens']} generated tokens per request; dtype {report['dtype']}; block size "
              f"{report['block_size']}; vllm {report['vllm']}; git {report['git'][:7]}; "
              f"{report['machine'].get('platform', '')}. Command: `{report['command']}`. Every reading: `bench.json`.",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (bench.json, README.md)")
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests per round (default 32)")
    parser.add_argument("--keep-tokens", type=int, default=64, help="visual tokens kept of 576 (default 64)")
    parser.add_argument("--methods", default="crop-region,crop-plc", help="engine methods to compare with full")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds after a warm-up (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images and questions")
    parser.add_argument("--dtype", default="float32",
                        help="engine dtype (default float32: this CPU has no bfloat16 matrix units, and vLLM's CPU "
                             "default, bfloat16, runs the prefill several times slower here)")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.requests < 1 or args.repeats < 1 or args.new_tokens < 2 or not 1 <= args.keep_tokens <= 576:
        parser.error("--requests and --repeats >= 1, --new-tokens >= 2, 1 <= --keep-tokens <= 576")
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
