"""``crop demo`` under 8 concurrent clients: each gets the answers its request gets alone (no cross-talk).

Starts the page on 127.0.0.1 with the embedded pair and fires 8 different requests (image,
question, methods, budget) at once through ``gradio_client``, one client per thread released
together by a barrier; every response must equal the response to the same request made alone,
and the library's own :func:`crop.demo.core.compare` for it. Needs Gradio (the ``demo`` extra,
``scripts/setup_demo.sh``); skipped without it, unless ``CROP_REQUIRE_DEMO=1`` (CI's demo job).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.demo

if importlib.util.find_spec("gradio") is None:
    if os.environ.get("CROP_REQUIRE_DEMO") == "1":
        raise RuntimeError("CROP_REQUIRE_DEMO=1 but gradio is missing (scripts/setup_demo.sh)")
    pytest.skip("the concurrent-clients test needs gradio (scripts/setup_demo.sh)", allow_module_level=True)

CLIENTS = 8
METHOD_SETS = (["crop-ilp"], ["crop-plc"], ["fastv", "crop-ilp"], ["crop-plc", "dart"])
Request = tuple[str, str, list[str], int]  # image path, question, methods, budget
Response = tuple[list[tuple[str, ...]], list[str], str]  # table rows, gallery captions, status line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """The page on a free local port, and the models it serves with."""
    from crop.demo.app import serve
    from crop.demo.core import load_demo_models

    models = load_demo_models()
    port = _free_port()
    app = serve(models, port=port, block=False)
    yield f"http://127.0.0.1:{port}/", models
    app.close()


@pytest.fixture(scope="module")
def requests(tmp_path_factory) -> list[Request]:
    """8 different requests: synthetic test scenes with their own questions, varied methods and budgets."""
    from crop.data.synth import generate

    folder = tmp_path_factory.mktemp("concurrent")
    out = []
    for i, sample in enumerate(generate(CLIENTS, seed=0, split="test", start=20)):
        path = folder / f"{sample.id}.png"
        sample.image.save(path)
        out.append((str(path), sample.question, METHOD_SETS[i % len(METHOD_SETS)], (28, 64)[i % 2]))
    return out


def _rows(table: str) -> list[tuple[str, ...]]:
    """Method, answer, visual tokens per stage and KV cache of each table row (the times vary run to run)."""
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    return [tuple(cell.strip() for cell in row[:4]) for row in rows[1:]]  # rows[0]: the header


def _ask(url: str, request: Request, start: threading.Barrier | None = None) -> Response:
    """One client's request through the page's API, as the browser sends it."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    if start is not None:
        start.wait(timeout=120)  # every client connected: send together
    path, question, methods, keep = request
    gallery, table, message = client.predict(handle_file(path), question, methods, keep, api_name="/run")
    return _rows(table), [item.get("caption") for item in gallery], message


def test_eight_concurrent_clients_each_get_their_own_answers(served, requests):
    from crop.demo.core import compare

    url, models = served
    alone = [_ask(url, r) for r in requests]
    for (path, question, methods, keep), (rows, captions, message) in zip(requests, alone, strict=True):
        assert message.startswith("Answerer "), message  # answered, not an error line
        expected = compare(models, path, question, methods, keep)  # the library's answers for this request
        assert [(row[0], row[1]) for row in rows] == [(o.method, o.answer or "(empty)") for o in expected]
        assert captions == [f"{o.method}: {o.answer}" for o in expected]
    answers = [tuple(row[1] for row in rows) for rows, _, _ in alone]
    assert len(set(answers)) >= 4  # different requests get different answers, so cross-talk would show

    start = threading.Barrier(CLIENTS)
    with ThreadPoolExecutor(CLIENTS) as pool:
        together = list(pool.map(lambda r: _ask(url, r, start), requests))
    assert together == alone
