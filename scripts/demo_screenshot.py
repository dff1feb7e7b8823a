"""Write the README's screenshot of ``crop demo``: the page served with the embedded pair, the shipped
sample uploaded in headless Chromium and the README's question asked (the browser test's code path).

Usage (in .venv-demo, made by ``bash scripts/setup_demo.sh --with-browser``):
    .venv-demo/bin/python scripts/demo_screenshot.py --out docs/demo.png
"""

from __future__ import annotations

import argparse
import socket


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/demo.png", help="PNG to write (default %(default)s)")
    args = parser.parse_args()

    from crop.demo.app import README_QUESTION, serve
    from crop.demo.browser import ask
    from crop.demo.core import load_demo_models
    from crop.io import sample_image_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = serve(load_demo_models(), port=port, block=False)
    try:
        seen = ask(f"http://127.0.0.1:{port}", sample_image_path(), README_QUESTION, screenshot=args.out,
                   methods=["full", "crop-ilp", "crop-plc", "fastv"], keep_tokens=28)
    finally:
        app.close()
    from PIL import Image

    with Image.open(args.out) as shot:  # a palette PNG: a third of the size, the same picture to the eye
        shot.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(seen.table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
