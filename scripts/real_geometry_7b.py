"""Real 7B geometry on the CPU (issue 28, item 7): time and peak memory of CROP and baselines, one run.

Builds ``llava-1.5-7b-geometry`` and ``qwen2.5-vl-7b-geometry`` (the public 7B configs with 2
decoder layers and random bfloat16 weights, see :mod:`crop.models.real_geometry`) and saves them
in the hub layout under WORK (outside git), then, one model at a time, each command in its own
process (its wall time and peak resident memory read from ``os.wait4``):

- ``crop answer`` on one synthetic sample per method (region = the sample's ground-truth box),
- ``crop eval --data`` on a JSONL of N synthetic samples (``crop synth`` output, ``answer`` as
  ``answers``) with all methods in one process (``full`` always runs as the reference).

Writes OUT/real_geometry_7b.json (machine, versions, commands, wall s, peak RSS, exit codes and
each command's last stderr lines), OUT/README.md (the tables), OUT/answer-<model>-<method>.json
and OUT/eval-<model>/ (results.json, results.md). Weights are random: answers and accuracies
mean nothing; the run shows that every method runs on the real widths, and what it costs here.
A command that fails is recorded with its error, not retried or hidden. Timings on a shared
2-core CPU are noisy: one measurement each.

Usage (repository root):
    nohup .venv/bin/python scripts/real_geometry_7b.py > runs/real-geometry-7b.log 2>&1 &
    .venv/bin/python scripts/real_geometry_7b.py --n 8 --methods crop-ilp,crop-plc,fastv,dart \
        --keep-tokens 64 --layer 1 --work runs/real-geometry-7b --out results/real-geometry-7b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CROP = str(ROOT / ".venv" / "bin" / "crop")
PYTHON = sys.executable
MODELS = ("llava-1.5-7b-geometry", "qwen2.5-vl-7b-geometry")
# methods `crop answer` takes --layer for (single-stage inner-LLM); it refuses --layer for the others (crop-plc)
LAYERED = {"crop-ilp", "ilp", "fastv", "dart", "random-inner"}


def run(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` to completion; its wall time, peak RSS (from ``wait4``), exit code and output files.

    Args:
        cmd: the command line.
        log: where its stdout (``.out``) and stderr (``.err``) go (suffixes appended).

    Returns:
        ``{"cmd", "wall_s", "peak_rss_gib", "rc", "stderr_tail"}``.
    """
    out, err = log.parent / f"{log.name}.out", log.parent / f"{log.name}.err"  # names hold dots ("1.5-7b")
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # reaped by wait4; keep Popen from waiting again
    tail = [line for line in err.read_text(errors="replace").splitlines() if line.strip()][-6:]
    row = {"cmd": cmd, "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "rc": rc,
           "stderr_tail": tail}
    print(f"  -> rc {rc}, {row['wall_s']} s, peak RSS {row['peak_rss_gib']} GiB", flush=True)
    return row


def machine() -> dict:
    """What ran this: CPU model and count, memory, versions, load average, git commit."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0.0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    import torch
    import transformers

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"machine": f"{os.cpu_count()}-core x86 CPU ({cpu}), {mem:.0f} GiB RAM, no GPU, shared with other jobs",
            "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "bf16_cpu_kernels": ("oneDNN bf16 supported" if torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                 else "no native bf16 (no AVX512-BF16/AMX): bf16 matmuls are emulated, slow"),
            "transformers": transformers.__version__, "git": git.strip() + ("+dirty" if dirty.strip() else ""),
            "load_average_at_start": os.getloadavg()}


def make_data(work: Path, n: int, seed: int) -> tuple[Path, dict]:
    """``crop synth`` N test samples, then the JSONL ``crop eval --data`` reads (``answers``, ``box_grid``)."""
    synth = work / "synth"
    if not (synth / "test.jsonl").is_file():
        subprocess.run([CROP, "synth", "--out", str(synth), "--split", "test", "--n", str(n), "--seed", str(seed),
                        "--no-progress"], cwd=ROOT, check=True)
    rows = [json.loads(line) for line in (synth / "test.jsonl").read_text().splitlines() if line.strip()][:n]
    data = work / "data.jsonl"
    with data.open("w") as f:
        for row in rows:
            image = (synth / row["image"]) if not Path(row["image"]).is_absolute() else Path(row["image"])
            f.write(json.dumps({"id": row["id"], "image": str(image.resolve()), "question": row["question"],
                                "answers": [row["answer"]], "box_grid": row["box_grid"],
                                "family": row.get("family")}) + "\n")
    first = json.loads(data.read_text().splitlines()[0])
    return data, first


def table(rows: list[dict], title: str, key: str) -> list[str]:
    lines = [f"### {title}", "", f"| model | {key} | wall s | peak RSS GiB | exit |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r[key]} | {r['wall_s']} | {r['peak_rss_gib']} | {r['rc']} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    """Build, save and run both real-geometry models; write OUT/real_geometry_7b.json and OUT/README.md.

    Args:
        argv: command-line arguments (``None``: ``sys.argv``).

    Returns:
        0 when every command ran (a failing method is recorded, not fatal), 1 when a model could not be built.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/real-geometry-7b", help="checkpoints, data, logs (outside git)")
    parser.add_argument("--out", default="results/real-geometry-7b", help="results folder")
    parser.add_argument("--n", type=int, default=8, help="eval samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="crop-ilp,crop-plc,fastv,dart")
    parser.add_argument("--keep-tokens", default="64")
    parser.add_argument("--layer", default="1", help="K: 1, since these models have 2 decoder layers (K=2 is "
                                                     "refused as outside the depth)")
    parser.add_argument("--max-new-tokens", default="4")
    parser.add_argument("--batch-size", default="8")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", default="save,answer,eval", help="any of save,answer,eval")
    args = parser.parse_args(argv)
    work, out = (ROOT / args.work).resolve(), (ROOT / args.out).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    steps = set(args.steps.split(","))
    report_path = out / "real_geometry_7b.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.setdefault("runs", {})
    report.update(machine=machine(), settings={k: v for k, v in vars(args).items()},
                  note="random bfloat16 weights, 2 decoder layers: answers and accuracy are meaningless; one "
                       "measurement per command on a shared 2-core CPU, so timings are noisy")
    data, first = make_data(work, args.n, args.seed)
    box = "box:" + ",".join(str(v) for v in first["box_grid"])
    common = ["--dtype", "bfloat16", "--device", "cpu", "--max-new-tokens", args.max_new_tokens]
    for model in args.models.split(","):
        folder = work / model
        runs = report["runs"].setdefault(model, {})
        if "save" in steps and not (folder / "config.json").is_file():
            code = ("import sys; from crop.models.real_geometry import save_real_geometry; "
                    "save_real_geometry(sys.argv[1], sys.argv[2])")
            runs["save"] = run([PYTHON, "-c", code, model, str(folder)], work / "logs" / f"save-{model}")
            report_path.write_text(json.dumps(report, indent=2) + "\n")
            if runs["save"]["rc"] != 0:
                print(f"could not build {model}; see {work}/logs", flush=True)
                return 1
        if "answer" in steps:
            for method in args.methods.split(","):
                row = run([CROP, "answer", first["image"], first["question"], "--model", str(folder),
                           "--localizer", box, "--method", method, "--keep-tokens", args.keep_tokens, *common,
                           *(["--layer", args.layer] if method in LAYERED else []), "--json"],
                          work / "logs" / f"answer-{model}-{method}")
                stdout = (work / "logs" / f"answer-{model}-{method}.out").read_text()
                if row["rc"] == 0:
                    (out / f"answer-{model}-{method}.json").write_text(stdout)
                    payload = json.loads(stdout)
                    row["answer_report"] = {k: payload.get(k) for k in ("visual_tokens_in", "visual_tokens_kept",
                                                                        "timings", "kv_cache_bytes") if k in payload}
                runs.setdefault("answer", {})[method] = row
                report_path.write_text(json.dumps(report, indent=2) + "\n")
        if "eval" in steps:
            runs["eval"] = run([CROP, "eval", "--data", str(data), "--model", str(folder), "--methods", args.methods,
                                "--keep-tokens", args.keep_tokens, "--localizer", "oracle", "--batch-size",
                                args.batch_size, "--layer", args.layer, *common,
                                "--out", str(out / f"eval-{model}")],
                               work / "logs" / f"eval-{model}")
            report_path.write_text(json.dumps(report, indent=2) + "\n")
    write_readme(report, out)
    return 0


def write_readme(report: dict, out: Path) -> None:
    """OUT/README.md: the machine, the caveats, and the time / memory tables from the report."""
    m, s = report["machine"], report["settings"]
    lines = ["# Real 7B geometry on the CPU (random weights, 2 decoder layers)", "",
             f"Machine: {m['machine']}; torch {m['torch']} ({m['torch_threads']} threads), transformers "
             f"{m['transformers']}; {m['bf16_cpu_kernels']}. Commit {m['git']}; load average at start "
             f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}.", "",
             f"Settings: --dtype bfloat16 --device cpu, --keep-tokens {s['keep_tokens']}, --layer {s['layer']} "
             f"(K=2 is refused on a 2-layer LM), --max-new-tokens {s['max_new_tokens']}; eval on {s['n']} `crop synth` "
             f"test samples with --localizer oracle, batch {s['batch_size']}. Each command ran once in its own "
             "process; wall time includes loading the checkpoint; peak RSS is the process's maximum resident "
             "memory. Measured once on a shared machine: noisy, not claims. Random weights: answers and "
             "accuracies are meaningless.", "",
             "Reproduce: `.venv/bin/python scripts/real_geometry_7b.py` (see its --help).", ""]
    answer_rows, eval_rows, save_rows = [], [], []
    for model, runs in report["runs"].items():
        if "save" in runs:
            save_rows.append({"model": model, "step": "build + save", **runs["save"]})
        for method, row in runs.get("answer", {}).items():
            rep = row.get("answer_report", {})
            label = method
            if rep:
                t = rep.get("timings", {})
                label = (f"{method}: tokens in {rep.get('visual_tokens_in')}, kept {rep.get('visual_tokens_kept')}; "
                         f"prefill {t.get('prefill_s', 0):.1f} s, decode {t.get('decode_s', 0):.1f} s")
            answer_rows.append({"model": model, "method": label, **row})
        if "eval" in runs:
            eval_rows.append({"model": model, "methods": "full," + s["methods"], **runs["eval"]})
    lines += table(save_rows, "Building and saving the checkpoint", "step")
    lines += table(answer_rows, "`crop answer` (one sample, one process per method)", "method")
    lines += table(eval_rows, f"`crop eval --data` ({s['n']} samples, all methods in one process)", "methods")
    failed = [(model, name, row) for model, runs in report["runs"].items()
              for name, row in [*runs.get("answer", {}).items(), ("eval", runs.get("eval", {"rc": 0}))]
              if row.get("rc", 0) != 0]
    if failed:
        lines += ["### Failures", ""] + [f"- {model} {name}: `{row['stderr_tail'][-1] if row['stderr_tail'] else ''}`"
                                         for model, name, row in failed] + [""]
    (out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
