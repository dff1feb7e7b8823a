"""How cheap can a Qwen2-VL localizer be next to the embedded answerer's prefill? (a cost probe)

Usage: .venv/bin/python scripts/localizer_cost_floor.py [--n 20] [--threads 1]

Times, in one process and interleaved sample by sample, the shipped answerer's prefill over all
its visual tokens (P) against the prefill + two-token box decode (A, what the shipped localizer
does) of Qwen2-VL localizers of decreasing size, from the shipped one's shape down to one vision
and one text layer. The smaller localizers have random weights: their boxes are meaningless, but
their cost is what a trained model of that shape would cost. Prints one row per shape with the
medians and A / P, which issue #3 wants at or below 0.25. Preprocessing is excluded on both
sides, as in ``crop train cost``'s A / P column.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="timed samples per shape (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from crop.data.synth import generate
    from crop.embedded import (
        build_from_shape,
        load_embedded_answerer,
        load_embedded_localizer,
        load_embedded_metadata,
    )
    from crop.localizers.vlm import VLMLocalizer
    from crop.train.answerer import answerer_prompt

    shipped = load_embedded_metadata("localizer")["shape"]
    shapes = {
        "shipped (3 vision + 4 text layers)": None,
        "2 vision + 2 text layers": dict(shipped, vision_layers=2, text_layers=2),
        "1 vision + 1 text layer": dict(shipped, vision_layers=1, text_layers=1),
        "1 + 1 layer, width 32": dict(shipped, vision_layers=1, text_layers=1, vision_hidden=32, text_hidden=32,
                                      text_intermediate=64),
    }
    answerer, a_proc = load_embedded_answerer()
    samples = list(generate(args.n + 1, 0, "test"))
    print("| localizer shape | A (ms) | P (ms) | A / P |\n|---|---|---|---|")
    for name, shape in shapes.items():
        model, proc = load_embedded_localizer() if shape is None else build_from_shape("qwen2_vl", shape)
        model.eval()
        loc = VLMLocalizer(model, proc, grid=8, batch_size=1, image_first=False)
        t_loc, t_ans = [], []
        with torch.no_grad():
            for i, s in enumerate(samples):
                inputs = loc.prepare([s.image], [s.question])
                a_in = a_proc(images=[s.image], text=[answerer_prompt(a_proc, s.question)], return_tensors="pt")
                t0 = time.perf_counter()
                model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
                t1 = time.perf_counter()
                answerer(**a_in)
                t2 = time.perf_counter()
                if i:  # the first sample warms up
                    t_loc.append(t1 - t0)
                    t_ans.append(t2 - t1)
        a_ms, p_ms = float(np.median(t_loc)) * 1e3, float(np.median(t_ans)) * 1e3
        print(f"| {name} | {a_ms:.2f} | {p_ms:.2f} | {a_ms / p_ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
