"""``crop demo``: a local web page comparing methods on one image and question (Gradio, optional)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``demo`` subcommand to ``subparsers`` (Gradio is imported only when it runs)."""
    p = subparsers.add_parser(
        "demo",
        help="start a local web page that compares methods on your image",
        description="Start a local Gradio page with the answerer and localizer preloaded: upload an image or "
        "pick a sample, ask a question, choose methods and a budget; each method's answer, overlay (region, "
        "kept tokens, pooled blocks), tokens per stage, KV cache and time against full are shown side by side. "
        "Needs the demo extra: pip install 'crop-vlm[demo]'. The page is served on 127.0.0.1 only "
        "(no public share link).",
    )
    p.add_argument("--model", default="embedded", help="answerer (default: the embedded one)")
    p.add_argument("--localizer", default=None, help="localizer (default: embedded with the embedded answerer)")
    p.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; anything else exposes the page "
                        "to your network)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the models, then serve the page until interrupted."""
    import importlib.util

    from crop.errors import CropInputError

    if importlib.util.find_spec("gradio") is None:
        raise CropInputError("crop demo needs Gradio: pip install 'crop-vlm[demo]'")
    if not 0 < args.port < 65536:
        raise CropInputError(f"--port must be in 1..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise CropInputError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    from crop.demo.app import serve
    from crop.demo.core import load_demo_models

    models = load_demo_models(args.model, args.localizer)
    where = "this machine only" if args.host in ("127.0.0.1", "localhost") else "reachable from your network"
    print(f"crop demo: serving on http://{args.host}:{args.port} ({where}); Ctrl+C stops it", flush=True)
    serve(models, args.host, args.port, args.max_upload_mb, block=True)
    return 0
