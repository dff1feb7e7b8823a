"""vLLM's OpenAI-compatible server with the crop plugin: chat completions with an image and crop options.

Starts the server once for the module on 127.0.0.1 (``python -m vllm.entrypoints.openai.api_server``:
the ``vllm`` console script of the CPU wheel looks up a distribution named ``vllm`` and fails),
with a server default (``--mm-processor-kwargs``) that requests override, sends good and bad
requests, and stops it. Runs in ``.venv-vllm`` (see tests/vllm_plugin/test_engine.py).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CROP_REQUIRE_VLLM") == "1":
        raise RuntimeError("CROP_REQUIRE_VLLM=1 but vLLM is not installed (run scripts/setup_vllm.sh)")
    pytest.skip("vLLM is not installed (scripts/setup_vllm.sh makes .venv-vllm)", allow_module_level=True)

from tests.conftest import random_image  # noqa: E402
from tests.vllm_plugin.server import running_server, served_qwen  # noqa: E402

BOX = [1, 2, 5, 6]
DEFAULT = {"crop": {"method": "crop-region", "keep_tokens": 24, "box": BOX}}  # the server's default


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    checkpoint = served_qwen(folder, "qwen2_vl")
    with running_server(folder, ["--model", checkpoint, "--trust-request-mm-kwargs",
                                 "--mm-processor-kwargs", json.dumps(DEFAULT)]) as base:
        yield base, checkpoint


def _image_url(seed: int) -> str:
    buffer = io.BytesIO()
    random_image(seed, (400, 300)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(server, crop="default", seed: int = 2) -> tuple[int, dict]:
    base, checkpoint = server
    body: dict = {"model": checkpoint, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _image_url(seed)}}, {"type": "text", "text": "How many circles?"}]}]}
    if crop != "default":
        body["mm_processor_kwargs"] = {"crop": crop}
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_the_server_default_and_per_request_options(server):
    status, stock = _chat(server, {"method": "none"})
    assert status == 200
    status, default = _chat(server)  # the server's default: the region's 24 tokens
    assert status == 200
    status, tighter = _chat(server, {"method": "crop-region", "keep_tokens": 8, "box": BOX})
    assert status == 200
    full, pruned, pruned8 = (r["usage"]["prompt_tokens"] for r in (stock, default, tighter))
    assert full - pruned == full - pruned8 - 16 > 0  # 16 more visual tokens dropped for keep_tokens 8 than for 24
    assert all(isinstance(r["choices"][0]["message"]["content"], str) for r in (stock, default, tighter))
    # a request naming a localizer wins over the server's default box (and the reverse), in the same server
    status, located = _chat(server, {"localizer": "box:0,0,3,3"})
    assert status == 200
    status, boxed = _chat(server, {"box": [0, 0, 3, 3]})
    assert status == 200
    assert located["usage"] == boxed["usage"] and located["choices"][0]["message"] == boxed["choices"][0]["message"]
    assert located["usage"]["prompt_tokens"] == pruned  # the default's 24 tokens, from another region


@pytest.mark.parametrize("crop,message", [({"method": "dart", "keep_tokens": 8}, "prunes inside the LLM"),
                                          ({"method": "crop-plc", "keep_tokens": 8, "box": BOX, "pool": 0}, "pool"),
                                          ({"keep_tokens": 8, "bbox": BOX}, "unknown crop option"),
                                          ({"localizer": "/no/such/localizer"}, "localizer")])
def test_a_bad_request_gets_a_400_and_the_server_keeps_serving(server, crop, message):
    status, body = _chat(server, crop)
    assert status == 400 and message in body["error"]["message"]
    assert _chat(server)[0] == 200
