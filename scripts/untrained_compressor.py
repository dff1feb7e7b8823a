"""Write a seeded, untrained PLC compressor sized for a random-weight model, for `crop bench` timing only.

`crop bench` measures costs on random-weight models (llava-shape-0.5b), whose answers mean nothing;
a trained compressor belongs to one answerer's token size, so none exists for those models. The
compressor's cost does not depend on its weights (the same matrix products and softmax run), so a
seeded untrained one of the model's size times crop-plc-trained honestly. Its JSON says it is
untrained; never use it for answers.

Usage: python scripts/untrained_compressor.py --model llava-shape-0.5b --out runs/compressor-llava-shape-0.5b
"""

from __future__ import annotations

import argparse

import torch

from crop.compressor import CompressorConfig, RegionCompressor, save_compressor
from crop.models.tiny import LLAVA_SHAPE_05B

SHAPES = {"llava-shape-0.5b": LLAVA_SHAPE_05B}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="llava-shape-0.5b")
    parser.add_argument("--out", required=True, help="folder to write compressor.safetensors + compressor.json into")
    parser.add_argument("--max-queries", type=int, default=64, help="query bank, as `crop train plc` (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    compressor = RegionCompressor(CompressorConfig(dim=SHAPES[args.model].text_hidden, max_queries=args.max_queries))
    folder = save_compressor(compressor, args.out, {"untrained": True, "for_model": args.model, "seed": args.seed,
                                                    "use": "crop bench timing only; its tokens are meaningless"})
    print(folder)


if __name__ == "__main__":
    main()
