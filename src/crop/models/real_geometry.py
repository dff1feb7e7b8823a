"""7B checkpoints' exact geometry with random weights and 2 decoder layers, built from configs in code.

``llava-1.5-7b-geometry`` and ``qwen2.5-vl-7b-geometry`` have every size of the public
``llava-hf/llava-1.5-7b-hf`` and ``Qwen/Qwen2.5-VL-7B-Instruct`` checkpoints (hidden sizes,
heads, KV heads, intermediate sizes, vocabularies, rope settings, the whole vision tower,
image sizes and patches, the processors, the special tokens at their real ids) except the
number of decoder layers (2 of 32 / 28, so a CPU holds them in bfloat16: ~2.1 GB and ~4.5 GB).
Pruning code then meets real widths, GQA ratios, M-RoPE sections, 576 LLaVA tokens per image,
Qwen's dynamic token grid and real vocabulary sizes, with no download. The weights are random:
answers are gibberish and accuracy means nothing; time and memory are what they measure.

:func:`build_real_geometry` builds one in memory (what :func:`crop.models.loading.load_model`
does for these names); :func:`save_real_geometry` writes it in the hub layout (``config.json``,
safetensors, ``preprocessor_config.json``, ``chat_template.json``, tokenizer files naming the
stock processor class), which ``load_model(<folder>)`` reads like a downloaded checkpoint.

Sources (hub pages read through a search index; each value below is cited to one of them):

- ``[L1]`` llava-hf/llava-1.5-7b-hf ``config.json``, as mirrored with
  ``"_name_or_path": "llava-hf/llava-1.5-7b-hf"`` in mohitsha/llava-1.5-7b-hf ``config.json``
  @ 1ebc2e4 (the llava-hf file's last change: 05ae243, "Update text config to Vicuna (#15)").
  Its ``text_config`` names only ``max_position_embeddings``, ``rms_norm_eps`` and
  ``vocab_size``; the rest are ``LlamaConfig`` defaults (the Vicuna-7B-v1.5 / Llama-2-7B sizes),
  written out here.
- ``[L2]`` llava-hf/llava-1.5-7b-hf ``added_tokens.json`` @ 1695216 (``<image>`` 32000,
  ``<pad>`` 32001) and ``tokenizer_config.json`` @ 6b71355 (bos ``<s>``, eos ``</s>``, pad
  ``<pad>``, ``padding_side`` left).
- ``[L3]`` ``preprocessor_config.json`` of llava-hf checkpoints (e.g. llava-hf/bakLlava-v1-hf
  @ 74bca1e, the same CLIP processor): ``CLIPImageProcessor``, shortest edge 336, 336x336
  center crop, bicubic (3), CLIP mean / std; ``processor_config.json`` of llava-hf-converted
  checkpoints: ``patch_size`` 14, ``num_additional_image_tokens`` 1,
  ``vision_feature_select_strategy`` default; the chat template of llava-hf/llava-1.5-13b-hf
  @ 657f531 (``USER: <image>\\n... ASSISTANT:``).
- ``[Q1]`` Qwen/Qwen2.5-VL-7B-Instruct ``config.json``, as in Qwen/Qwen2.5-VL-7B-Instruct-AWQ
  ``config.json`` @ 58f8ed7 and unsloth/Qwen2.5-VL-7B-Instruct ``config.json`` (both
  ``"_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"``); the vision sizes the original file leaves
  to the class defaults are written out as in a full ``vision_config`` of a fine-tune of it
  (Icey444/Ground-R1_orig_1050 ``config.json``: depth 32, hidden 1280, intermediate 3420,
  16 heads, out 3584, window 112, full attention in blocks 7, 15, 23, 31).
- ``[Q2]`` ``added_tokens.json`` of Qwen2.5 tokenizers (e.g. scilo/qwen_finetuned_11_5_v2
  @ a4247e3, 605 bytes like Qwen2.5-VL-7B-Instruct's): 22 specials from ``<|endoftext|>``
  151643 to ``<|file_sep|>`` 151664; eos ``<|im_end|>``, pad ``<|endoftext|>``.
- ``[Q3]`` ``preprocessor_config.json`` of Qwen2.5-VL checkpoints (e.g. jongwooko/Flex-VL-7B,
  coder3101/Qwen2.5-VL-72B-Instruct-heretic, 350 bytes like the original's): min_pixels 3136,
  max_pixels 12845056, patch 14, temporal patch 2, merge 2, CLIP mean / std,
  ``Qwen2VLImageProcessor``, ``Qwen2_5_VLProcessor``; the chat template of Qwen2-VL /
  Qwen2.5-VL ``chat_template.json`` (default system prompt, ``<|vision_start|><|image_pad|>
  <|vision_end|>`` per image).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REAL_GEOMETRY_NAMES = ("llava-1.5-7b-geometry", "qwen2.5-vl-7b-geometry")
DECODER_LAYERS = 2
# The same geometry at the checkpoints' full depth ([L1]: 32 decoder layers, [Q1]: 28): a 7B model's
# whole compute with random weights, for timings on a GPU (~14 GB / ~16 GB in bfloat16, built
# directly on the target device). Name -> (geometry, decoder layers).
FULL_DEPTH = {"llava-1.5-7b-geometry-full": ("llava-1.5-7b-geometry", 32),
              "qwen2.5-vl-7b-geometry-full": ("qwen2.5-vl-7b-geometry", 28)}
FULL_DEPTH_NAMES = tuple(FULL_DEPTH)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # [L3], [Q3]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# [L3] llava-hf/llava-1.5-13b-hf @ 657f531: images first, then the texts, roles upper-cased
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
    "{% else %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# [Q3] Qwen2-VL / Qwen2.5-VL chat_template.json: a default system turn, one vision block per image / video
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# [Q2], in id order from 151643
QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN25_BASE_VOCAB = 151643  # [Q2]: the first special's id = the number of BPE tokens
LLAVA_BASE_VOCAB = 32000  # [L2]: <image> is the first id after Llama-2's 32000 tokens


def _filled(vocab: dict[str, int], size: int) -> dict[str, int]:
    """``vocab`` padded with never-produced filler entries to ``size`` entries, so added tokens land at real ids."""
    i = 0
    while len(vocab) < size:
        vocab.setdefault(f"<|crop_filler_{i}|>", len(vocab))
        i += 1
    return vocab


def llava_15_tokenizer():
    """A Llama tokenizer with LLaVA-1.5's ids where CROP reads them, built offline.

    ``<unk> <s> </s>`` at 0-2 and the 256 byte-fallback tokens at 3-258 as in Llama-2, single
    characters, fillers up to 32000 entries, then ``<image>`` = 32000 and ``<pad>`` = 32001
    ([L2]). Text encodes byte- or character-wise (there are no merges), so prompts are longer than
    with the real tokenizer; the vocabulary size and the special ids are the real ones.

    Returns:
        A ``LlamaTokenizer`` of 32002 tokens, padding on the left.
    """
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["▁"] + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(ch, len(vocab))
    tok = LlamaTokenizer(vocab=_filled(vocab, LLAVA_BASE_VOCAB), merges=[])
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = "left"
    return tok


def qwen25_tokenizer():
    """A Qwen2 tokenizer with Qwen2.5-VL's ids where CROP reads them, built offline.

    The 256 byte-level symbols, fillers up to 151643 entries, then the 22 specials of [Q2] at
    their real ids (``<|vision_start|>`` 151652, ``<|image_pad|>`` 151655, ``<|video_pad|>``
    151656, ...). Added in id order before eos / pad are named, so no special moves.

    Returns:
        A ``Qwen2Tokenizer`` of 151665 tokens; eos ``<|im_end|>``, pad ``<|endoftext|>``.
    """
    from transformers import Qwen2Tokenizer

    from crop.models.tokenizers import gpt2_byte_alphabet

    vocab = _filled({c: i for i, c in enumerate(gpt2_byte_alphabet())}, QWEN25_BASE_VOCAB)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token=None, pad_token=None)
    tok.add_tokens(list(QWEN25_SPECIAL_TOKENS), special_tokens=True)
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    return tok


def llava_15_7b_config(decoder_layers: int = DECODER_LAYERS):
    """The ``LlavaConfig`` of ``llava-hf/llava-1.5-7b-hf`` ([L1]) with ``decoder_layers`` LM layers.

    Args:
        decoder_layers: Llama decoder layers (the checkpoint has 32).

    Returns:
        A ``LlavaConfig``: CLIP ViT-L/14-336 (24 layers, 1024 wide), the 2-layer GELU projector
        and a Vicuna-7B-shaped Llama (4096 wide, 32 heads, 32 KV heads, 11008 MLP, vocab 32064).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(  # [L1] vision_config
        hidden_size=1024, image_size=336, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
        patch_size=14, projection_dim=768,
    )
    text = LlamaConfig(  # [L1] text_config: max positions, eps and vocab; the LlamaConfig defaults it relies on
        vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_size=4096,
        intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_hidden_layers=decoder_layers,
        bos_token_id=1, eos_token_id=2, pad_token_id=32001,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=32000,  # [L1]
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=576, tie_word_embeddings=False,
    )
    config.pad_token_id = 32001  # [L1], top level too
    return config


def qwen25_vl_7b_config(decoder_layers: int = DECODER_LAYERS):
    """The ``Qwen2_5_VLConfig`` of ``Qwen/Qwen2.5-VL-7B-Instruct`` ([Q1]) with ``decoder_layers`` LM layers.

    Args:
        decoder_layers: Qwen2 decoder layers (the checkpoint has 28).

    Returns:
        A ``Qwen2_5_VLConfig``: the 32-block windowed ViT (1280 wide, patch 14, merge 2) and a
        Qwen2.5-7B-shaped LM (3584 wide, 28 heads, 4 KV heads, 18944 MLP, vocab 152064,
        M-RoPE sections 16/24/24, theta 1e6).
    """
    from transformers import Qwen2_5_VLConfig

    text: dict[str, Any] = dict(  # [Q1]
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=decoder_layers,
        num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000,
        rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, max_window_layers=28,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
    )
    vision: dict[str, Any] = dict(  # [Q1] vision_config
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, out_hidden_size=3584,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu",
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False,
    )


# [L3] the processor's own fields, as llava-hf's processor_config.json holds them
LLAVA_PROCESSOR_KWARGS: dict[str, Any] = dict(patch_size=14, vision_feature_select_strategy="default",
                                              num_additional_image_tokens=1, image_token="<image>")


def llava_15_7b_processor():
    """``llava-hf/llava-1.5-7b-hf``'s processor ([L2], [L3]): CLIP at 336 px (PIL backend) + the real-id tokenizer."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(  # [L3] "image_processor_type": "CLIPImageProcessor"
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True, resample=3,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=llava_15_tokenizer(), **LLAVA_PROCESSOR_KWARGS,
                          chat_template=LLAVA_HF_CHAT_TEMPLATE)


def qwen25_vl_7b_processor():
    """``Qwen/Qwen2.5-VL-7B-Instruct``'s processor ([Q2], [Q3]), image-only (no torchvision), PIL backend."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from crop.models.processors import qwen_image_only_processor_class

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    return qwen_image_only_processor_class(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=qwen25_tokenizer(), chat_template=QWEN_VL_CHAT_TEMPLATE
    )


def real_geometry_config(name: str, decoder_layers: int = DECODER_LAYERS):
    """The config of one of :data:`REAL_GEOMETRY_NAMES` with ``decoder_layers`` decoder layers.

    Args:
        name: ``"llava-1.5-7b-geometry"`` or ``"qwen2.5-vl-7b-geometry"``.
        decoder_layers: decoder layers of the language model (the checkpoints have 32 / 28).

    Returns:
        A ``LlavaConfig`` or ``Qwen2_5_VLConfig``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name == "llava-1.5-7b-geometry":
        return llava_15_7b_config(decoder_layers)
    if name == "qwen2.5-vl-7b-geometry":
        return qwen25_vl_7b_config(decoder_layers)
    raise ValueError(f"unknown real-geometry model {name!r}; known: {', '.join(REAL_GEOMETRY_NAMES)}")


def _model_class(name: str):
    from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    return LlavaForConditionalGeneration if name.startswith("llava") else Qwen2_5_VLForConditionalGeneration


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside are ``dtype`` from the start (no float32 copy of a 4.5 GB model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_real_geometry(name: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                        attn_implementation: str = "sdpa", decoder_layers: int = DECODER_LAYERS,
                        device: str | torch.device = "cpu"):
    """A seeded random model of one of :data:`REAL_GEOMETRY_NAMES` and its processor.

    Args:
        name: ``"llava-1.5-7b-geometry"`` or ``"qwen2.5-vl-7b-geometry"``, or one of
            :data:`FULL_DEPTH_NAMES` (the same at the checkpoint's depth; ``decoder_layers`` is
            then ignored).
        seed: torch seed for the weights.
        dtype: parameter dtype, used from creation on (bfloat16: ~2.1 GB / ~4.5 GB with 2 layers).
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        decoder_layers: decoder layers of the language model; ``device="meta"`` with the
            checkpoint's count (32 / 28) gives the full model's shapes without allocating them.
        device: where the parameters are created (``"meta"``: shapes only; ``"cuda"``: no
            host copy, and random initialization at the GPU's speed).

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        ValueError: for an unknown name.
    """
    name, decoder_layers = FULL_DEPTH.get(name, (name, decoder_layers))
    config = real_geometry_config(name, decoder_layers)
    config.dtype = dtype  # saved in config.json as the checkpoints' "torch_dtype"
    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        model = _model_class(name)(config)
    model.set_attn_implementation(attn_implementation)
    processor = llava_15_7b_processor() if name.startswith("llava") else qwen25_vl_7b_processor()
    return model.eval(), processor


def save_real_geometry(name: str, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       decoder_layers: int = DECODER_LAYERS) -> Path:
    """Build one of :data:`REAL_GEOMETRY_NAMES` and write it in the hub layout.

    The folder holds what the hub checkpoint holds: ``config.json`` + ``generation_config.json``,
    safetensors, ``preprocessor_config.json``, ``chat_template.json``, the tokenizer's files and,
    for LLaVA, ``processor_config.json``, for Qwen, ``video_preprocessor_config.json``, all naming
    the stock processor classes (``LlavaProcessor``, ``Qwen2_5_VLProcessor``), so that
    ``load_model(path)`` takes the same path as for a downloaded checkpoint.

    Args:
        name: ``"llava-1.5-7b-geometry"`` or ``"qwen2.5-vl-7b-geometry"``.
        path: the folder to write (created if missing).
        seed: torch seed for the weights.
        dtype: parameter dtype of the saved weights.
        decoder_layers: decoder layers of the language model.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from crop.models.processors import save_hub_layout

    path = Path(path)
    model, processor = build_real_geometry(name, seed=seed, dtype=dtype, decoder_layers=decoder_layers)
    model.save_pretrained(str(path))
    if name.startswith("llava"):
        save_hub_layout(processor, path, "LlavaProcessor", processor_kwargs=LLAVA_PROCESSOR_KWARGS)
    else:
        save_hub_layout(processor, path, "Qwen2_5_VLProcessor", video=True)
    return path
