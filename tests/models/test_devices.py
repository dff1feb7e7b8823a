"""Devices and precision: --device / --dtype / --attn / --device-map / --localizer-device, on the CPU.

The GPU tests' bodies (tests/test_gpu.py) run here on the CPU in float32 (and bfloat16, which
puts the processor wrapper that moves and casts inputs on the path), so they are exercised on
every machine; unavailable devices and unsupported dtypes are one-line errors, tested with
CUDA / MPS faked absent or present.
"""

from __future__ import annotations

import copy

import pytest
import torch

from crop.cli import main
from crop.errors import CropInputError
from crop.models import loading
from crop.models.loading import (
    DeviceProcessor,
    check_attention,
    input_device,
    load_model,
    resolve_device,
    resolve_dtype,
    synchronize,
)
from tests.conftest import chat_inputs, random_image, tiny
from tests.test_gpu import (
    check_bench_smoke,
    check_cache_and_batch,
    check_grounding_localizer,
    check_keep_all_and_removal,
    check_kv_lengths,
    check_pipeline,
)


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without CUDA or MPS, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "_mps_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch):
    """This machine as one with a single CUDA device (only the checks run; nothing is placed on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(loading, "_cuda_bf16", lambda device: True)


# -- the GPU tests' bodies, on the CPU ------------------------------------------------------------


@pytest.mark.parametrize("method,name", [("crop-ilp", "tiny-random-llava"), ("crop-plc", "tiny-random-qwen2-vl")])
def test_gpu_bodies_on_cpu_float32(method, name):
    check_keep_all_and_removal(name, method, "cpu", "float32")
    check_cache_and_batch(name, method, "cpu", "float32")
    check_kv_lengths(name, method, "cpu", "float32")


@pytest.mark.parametrize("method,name", [("fastv", "tiny-random-llava-next"), ("dart", "tiny-random-qwen2.5-vl")])
def test_gpu_bodies_on_cpu_bfloat16(method, name):
    # half precision on the CPU: the processor wrapper casts pixel values, the tolerances of the GPU run apply
    check_keep_all_and_removal(name, method, "cpu", "bfloat16")
    check_cache_and_batch(name, method, "cpu", "bfloat16")
    check_kv_lengths(name, method, "cpu", "bfloat16")


def test_pipeline_body_on_cpu_bfloat16():
    check_pipeline("tiny-random-llava", "cpu", "bfloat16")


def test_pipeline_body_with_device_map_auto_on_cpu():
    check_pipeline("tiny-random-llava", "auto", "float32", device_map="auto")  # accelerate places it all on the CPU


def test_grounding_localizer_body_on_cpu():
    check_grounding_localizer("cpu")


def test_bench_body_on_cpu(tmp_path):
    results = check_bench_smoke(tmp_path, "cpu", "float32")
    assert results["devices"] == {"answerer": "cpu", "dtype": "float32", "attn": "sdpa", "device_map": None}


def test_bench_body_on_cpu_in_bfloat16(tmp_path):
    """The analytic KV bytes follow the model's dtype (a bf16 cache is half a float32 one)."""
    results = check_bench_smoke(tmp_path, "cpu", "bfloat16")
    assert results["devices"]["dtype"] == "bfloat16"


# -- resolving devices and dtypes -----------------------------------------------------------------


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, no_gpu):
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(loading, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps") == resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda", 0) == resolve_device("CUDA")


def test_unavailable_devices_are_one_line_errors(no_gpu):
    for spec in ("cuda", "cuda:0", "mps"):
        with pytest.raises(CropInputError, match="not available on this machine") as err:
            resolve_device(spec)
        assert "\n" not in str(err.value)


def test_cuda_index_beyond_the_gpus_says_how_many_there_are(one_gpu):
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(CropInputError, match=r"1 CUDA device\(s\) \(cuda:0 .. cuda:0\)"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "cuda:", "gpu", "", "cpu:0"])
def test_unknown_device_words(spec):
    with pytest.raises(CropInputError, match="unknown device"):
        resolve_device(spec)


def test_auto_dtype_is_bfloat16_on_cuda_only_where_supported(monkeypatch, one_gpu):
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype(None, "mps") is torch.float32
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype(torch.float16, "cuda:0") is torch.float16
    monkeypatch.setattr(loading, "_cuda_bf16", lambda device: False)
    assert resolve_dtype("auto", "cuda:0") is torch.float32
    with pytest.raises(CropInputError, match=r"bfloat16 is not supported on cuda:0 \(Fake GPU\)"):
        resolve_dtype("bfloat16", "cuda:0")


def test_dtype_errors(monkeypatch):
    with pytest.raises(CropInputError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(CropInputError, match="unsupported dtype"):
        resolve_dtype(torch.float64, "cpu")
    monkeypatch.setattr(loading, "_works_on", lambda device, dtype: False)
    with pytest.raises(CropInputError, match="bfloat16 is not supported on mps"):
        resolve_dtype("bfloat16", "mps")
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16  # slow, but it runs


def test_flash_attention_needs_cuda_half_precision_and_the_package(monkeypatch):
    check_attention("sdpa", "cpu", torch.float32)
    with pytest.raises(CropInputError, match="needs a CUDA device, not cpu"):
        check_attention("flash_attention_2", "cpu", torch.bfloat16)
    with pytest.raises(CropInputError, match="needs --dtype bfloat16 or float16, not float32"):
        check_attention("flash_attention_2", "cuda:0", torch.float32)
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CropInputError, match="needs the flash-attn package"):
        check_attention("flash_attention_2", "cuda:0", torch.bfloat16)
    with pytest.raises(CropInputError, match="unknown attention implementation"):
        check_attention("flash", "cpu", torch.float32)


def test_synchronize_is_a_no_op_on_the_cpu():
    synchronize()
    synchronize("cpu")


# -- the loader -----------------------------------------------------------------------------------


def test_float32_cpu_model_keeps_its_plain_processor():
    model, proc = load_model("tiny-random-llava", device="cpu", dtype="auto")
    assert model.dtype == torch.float32 and input_device(model).type == "cpu"
    assert not isinstance(proc, DeviceProcessor)
    ref, _ = tiny("tiny-random-llava")
    inputs = chat_inputs(proc, [random_image(1)], ["What?"])
    assert torch.equal(model(**inputs).logits, ref(**inputs).logits)  # same seed, same model


def test_bfloat16_model_gets_a_processor_that_casts_its_inputs():
    model, proc = load_model("tiny-random-qwen2-vl", device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and isinstance(proc, DeviceProcessor)
    inputs = chat_inputs(proc, [random_image(1)], ["What?"])
    assert inputs["pixel_values"].dtype == torch.bfloat16 and inputs["input_ids"].dtype == torch.long
    assert inputs["image_grid_thw"].dtype == torch.long  # only floating tensors are cast
    assert model(**inputs).logits.dtype == torch.bfloat16
    # everything else is the wrapped processor's, and attributes set on the wrapper land there
    assert proc.tokenizer is proc.processor.tokenizer
    assert proc.batch_decode([[65]]) == proc.processor.batch_decode([[65]])
    text = proc.tokenizer(["ab"], return_tensors="pt")
    assert proc(text=["ab"], return_tensors="pt")["input_ids"].tolist() == text["input_ids"].tolist()
    proc.chat_template = proc.processor.chat_template
    assert "chat_template" not in vars(proc)
    assert "DeviceProcessor(" in repr(proc)
    clone = copy.copy(proc)  # rebuilt without __init__: no recursion through __getattr__
    assert isinstance(clone, DeviceProcessor) and clone.processor is proc.processor


def test_checkpoint_loads_with_dtype_and_device_map(tmp_path):
    model, proc = tiny("tiny-random-llava")
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    half, _ = load_model(str(tmp_path), dtype="bfloat16")  # through from_pretrained(dtype=...)
    assert half.dtype == torch.bfloat16
    mapped, mapped_proc = load_model(str(tmp_path), device="auto", device_map="auto")  # accelerate: all on the CPU here
    assert {p.device.type for p in mapped.parameters()} == {"cpu"} and mapped.dtype == torch.float32
    inputs = chat_inputs(mapped_proc, [random_image(1)], ["What?"])
    torch.testing.assert_close(mapped(**inputs).logits, model(**inputs).logits)


def test_loader_errors_are_one_line(no_gpu):
    with pytest.raises(CropInputError, match="not available on this machine"):
        load_model("tiny-random-llava", device="cuda")
    with pytest.raises(CropInputError, match="leave --device at auto"):
        load_model("tiny-random-llava", device="cpu", device_map="auto")
    with pytest.raises(CropInputError, match="unknown device map"):
        load_model("tiny-random-llava", device="auto", device_map="everywhere")
    with pytest.raises(CropInputError, match="flash_attention_2 needs a CUDA device"):
        load_model("tiny-random-llava", attn_implementation="flash_attention_2", dtype="bfloat16")


# -- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["answer", "eval", "bench"])
def test_every_device_flag_has_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for flag in ("--device ", "--dtype", "--attn", "--device-map", "--localizer-device", "flash_attention_2",
                 "bfloat16", "cuda:N"):
        assert flag in text, (command, flag)


def _answer(tmp_path, *flags):
    img = tmp_path / "img.png"
    random_image(3).save(img)
    return main(["answer", str(img), "What is it?", "--model", "tiny-random-llava", "--localizer", "box:0,0,3,3",
                 "--max-new-tokens", "2", *flags])


@pytest.mark.parametrize("flags,message", [
    (["--device", "cuda"], "device cuda is not available on this machine"),
    (["--device", "cuda:1"], "device cuda:1 is not available"),
    (["--device", "mps"], "device mps is not available"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--localizer-device", "cuda"], "device cuda is not available"),
    (["--device-map", "auto", "--device", "cpu"], "leave --device at auto"),
    (["--attn", "flash_attention_2", "--dtype", "bfloat16"], "flash_attention_2 needs a CUDA device"),
])
def test_answer_device_errors(tmp_path, capsys, no_gpu, flags, message):
    assert _answer(tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("crop answer: error:")


def test_answer_bad_dtype_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _answer(tmp_path, "--dtype", "int8")
    assert exit_.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err


def test_answer_json_in_bfloat16_on_cpu(tmp_path, capsys):
    import json

    assert _answer(tmp_path, "--device", "cpu", "--dtype", "bfloat16", "--method", "ilp", "--keep-tokens", "16",
                   "--json") == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["visual_tokens_kept"] == {"llm_input": 576, "after_layer_2": 16}


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_eval_and_bench_refuse_unavailable_devices_before_loading(tmp_path, capsys, no_gpu, monkeypatch, command):
    def no_model(*args, **kwargs):
        raise AssertionError("no model may load for a bad device")

    monkeypatch.setattr("crop.models.loading.load_model", no_model)
    args = [command, "--model", "tiny-random-llava", "--device", "cuda:0", "--out", str(tmp_path / "out")]
    if command == "eval":
        args += ["--localizer", "oracle", "--n", "1"]
    assert main(args) == 2
    assert "device cuda:0 is not available" in capsys.readouterr().err
