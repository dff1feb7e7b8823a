"""Start vLLM's OpenAI-compatible server with the crop plugin on 127.0.0.1, for the tests that talk to one.

``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of the CPU wheel looks
up a distribution named ``vllm`` and fails), in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
float32, eager, one image per prompt; stopped when the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from crop.vllm_plugin.checkpoints import save_vllm_qwen

TEST_FLAGS = ("--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--limit-mm-per-prompt",
              '{"image": 1}')


def served_qwen(folder: Path, version: str) -> str:
    """A tiny random Qwen checkpoint in ``folder`` whose tokenizer config carries the chat template, as the hub's do."""
    checkpoint = save_vllm_qwen(folder, version)
    config = folder / "tokenizer_config.json"
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": template}))
    return checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(folder: Path, arguments: Sequence[str], port: int | None = None) -> Iterator[str]:
    """Run the server with ``arguments`` (plus :data:`TEST_FLAGS`, host and port); yields its base URL."""
    port = port or free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *arguments,
                                    "--host", "127.0.0.1", "--port", str(port), *TEST_FLAGS],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 240
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the server did not come up in 240 s") from None
                    time.sleep(1)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
