"""The serving commands of the README and docs/serving-vllm.md run as written (issue 34), on a tiny checkpoint.

The server command is taken from the docs (the README's and the serving page's must be the same
command), with the hub ids swapped for a tiny random Qwen2.5-VL (it serves as the answerer and as
the grounding localizer of the server's default) and the test flags of
:data:`tests.vllm_plugin.server.TEST_FLAGS` added. Then the serving page's Python client runs
against it, its image URL swapped for a data URL, and its request must be pruned to its 64 tokens.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
import shlex
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CROP_REQUIRE_VLLM") == "1":
        raise RuntimeError("CROP_REQUIRE_VLLM=1 but vLLM is not installed (run scripts/setup_vllm.sh)")
    pytest.skip("vLLM is not installed (scripts/setup_vllm.sh makes .venv-vllm)", allow_module_level=True)

from tests.conftest import random_image  # noqa: E402
from tests.docs.test_snippets import blocks, commands  # noqa: E402
from tests.vllm_plugin.server import running_server, served_qwen  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "serving-vllm.md"
HUB_IDS = ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct")


def server_command(page: Path) -> str:
    found = [c for b in blocks(page, "bash") for c in commands(b) if "vllm.entrypoints.openai.api_server" in c]
    assert len(found) == 1, found
    return found[0]


def test_readme_and_serving_page_give_the_same_server_command():
    assert server_command(ROOT / "README.md") == server_command(PAGE)


def test_the_documented_server_and_client_work(tmp_path, monkeypatch, capsys):
    checkpoint = served_qwen(tmp_path, "qwen2_5_vl")
    command = server_command(PAGE)
    for hub_id in HUB_IDS:
        command = command.replace(hub_id, checkpoint)
    argv = shlex.split(command)
    assert argv[:3] == [".venv-vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    monkeypatch.setenv("CROP_VLLM_LOCALIZER_DEVICE", "cpu")
    with running_server(tmp_path, argv[3:]) as base:
        buffer = io.BytesIO()
        random_image(5, (400, 300)).save(buffer, format="PNG")
        client = blocks(PAGE, "python")[0]
        assert "http://127.0.0.1:8000/v1" in client and "https://example.com/bus.jpg" in client
        client = (client.replace("http://127.0.0.1:8000", base).replace(HUB_IDS[0], checkpoint)
                  .replace("https://example.com/bus.jpg",
                           "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()))
        namespace: dict = {}
        exec(compile(client, "serving-vllm.md, python block 1", "exec"), namespace)  # noqa: S102
        reply = namespace["reply"]
        assert capsys.readouterr().out.strip() == reply.choices[0].message.content.strip()
        # the same request unpruned: the documented one dropped every visual token but its 64
        unpruned = namespace["client"].chat.completions.create(
            model=checkpoint, messages=_messages(client, namespace), max_tokens=1,
            extra_body={"mm_processor_kwargs": {"crop": {"method": "none"}}})
        visual = _visual_tokens(checkpoint)
        assert unpruned.usage.prompt_tokens - reply.usage.prompt_tokens == visual - 64 > 0


def _messages(client_code: str, namespace: dict) -> list:
    """The documented request's messages, evaluated from the client block."""
    match = re.search(r"messages=(\[.*?\]\}\]),\n", client_code, re.S)
    assert match, "the client block's messages"
    return eval(match.group(1), namespace)  # noqa: S307  (the docs' own literal)


def _visual_tokens(checkpoint: str) -> int:
    """How many visual tokens the tiny checkpoint's processor makes of the 400x300 test image."""
    from crop.models.processors import load_checkpoint_processor

    processor = load_checkpoint_processor(checkpoint)
    grid = processor.image_processor(images=[random_image(5, (400, 300))], return_tensors="pt")["image_grid_thw"]
    return int(grid[0].prod()) // 4
