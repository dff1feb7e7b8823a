"""The ``crop demo`` page (Gradio): pick or upload an image, ask, compare methods side by side.

Everything the page shows comes from :func:`crop.demo.core.compare`; this module only lays it
out. Errors are shown in the page as one line (the CLI's messages), never as a traceback.
The server binds to 127.0.0.1 unless told otherwise, and has no public share link.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from crop.demo.core import DEFAULT_METHODS, DEMO_METHODS, MAX_UPLOAD_MB, DemoModels, compare, summary_table
from crop.errors import CropInputError

logger = logging.getLogger(__name__)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no calls home

README_QUESTION = "What color is the star?"


def sample_scenes(folder: str | Path, n: int = 3) -> list[tuple[str, str]]:
    """``(image path, question)`` examples: the package's sample image, then ``n`` synthetic test scenes.

    The scenes are drawn by the package's own generator (seeded), written to ``folder``.
    """
    from crop.data.synth import generate
    from crop.io import sample_image_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples = [(str(sample_image_path()), README_QUESTION)]
    for sample in generate(n, seed=0, split="test", start=1):
        path = folder / f"{sample.id}.png"
        sample.image.save(path)
        examples.append((str(path), sample.question))
    return examples


def build_app(models: DemoModels, max_upload_mb: float = MAX_UPLOAD_MB, repeats: int = 3):
    """The Gradio Blocks of the page, with ``models`` preloaded."""
    import gradio as gr

    examples = sample_scenes(Path(tempfile.mkdtemp(prefix="crop-demo-")))

    def run(image, question, methods, keep):
        try:
            outcomes = compare(models, image, question, methods, keep, max_upload_mb=max_upload_mb, repeats=repeats)
        except CropInputError as exc:
            return [], "", f"**Error:** {exc}"
        except Exception as exc:  # the page must never show a traceback
            logger.exception("demo request failed")
            return [], "", f"**Error:** the request failed ({type(exc).__name__}: {exc})"
        gallery = [(o.overlay, f"{o.method}: {o.answer}") for o in outcomes if o.overlay is not None]
        note = (f"Answerer `{models.model_name}`, localizer `{models.localizer_name}`; times are medians of "
                f"{repeats} runs on this machine (noisy on a shared CPU), the localizer included in end to end.")
        return gallery, summary_table(outcomes), note

    with gr.Blocks(title="crop demo") as app:
        gr.Markdown("# crop: answer with a fraction of the visual tokens\n"
                    "Red: the region the localizer found. Bright, green-outlined: tokens kept at full resolution; "
                    "dimmed: dropped (or, for crop-plc, pooled: one token per blue block).")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="image", sources=["upload"], elem_id="crop-image")
                question = gr.Textbox(label="question", value=README_QUESTION, elem_id="crop-question")
                methods = gr.CheckboxGroup(list(DEMO_METHODS), value=list(DEFAULT_METHODS), label="methods",
                                           elem_id="crop-methods")
                keep = gr.Number(value=28, precision=0, label="visual tokens to keep (of the image's; 256 for the "
                                 "embedded answerer)", elem_id="crop-keep")
                button = gr.Button("Answer", variant="primary", elem_id="crop-run")
                gr.Examples(examples=[list(e) for e in examples], inputs=[image, question], label="samples")
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="crop-message")
                gallery = gr.Gallery(label="what each method kept", columns=3, height="auto", elem_id="crop-gallery")
                table = gr.Markdown(elem_id="crop-table")
        button.click(run, inputs=[image, question, methods, keep], outputs=[gallery, table, message])
    return app


def serve(models: DemoModels, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = MAX_UPLOAD_MB,
          block: bool = True):
    """Start the page on ``host:port`` (no share link); returns the app (running in the background if not ``block``)."""
    app = build_app(models, max_upload_mb)
    app.queue(default_concurrency_limit=1)  # one model, one request at a time
    app.launch(server_name=host, server_port=port, share=False, max_file_size=f"{max_upload_mb:g}mb",
               prevent_thread_lock=not block, inbrowser=False, show_error=False, quiet=True)
    return app
