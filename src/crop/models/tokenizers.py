"""Byte-level tokenizers and chat templates built in code, with no hub files.

The tiny random models (tests, smoke runs) and the embedded models (trained here from scratch)
need tokenizers, and nothing may be downloaded. transformers 5.x tokenizer classes accept
``vocab=``/``merges=`` directly, so a byte-fallback vocabulary gives a tokenizer that encodes
every string and decodes it back exactly.
"""

from __future__ import annotations

LLAVA_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% if not loop.last %} {% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def llama_byte_tokenizer():
    """A Llama tokenizer over bytes: ``<unk> <s> </s>``, 256 byte-fallback tokens, ``▁`` and ASCII.

    Returns:
        A ``LlamaTokenizer`` with ``<pad>`` and the special ``<image>`` token added (356 tokens).
    """
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["▁"] + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(ch, len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def _gpt2_byte_alphabet() -> list[str]:
    """The 256 printable characters GPT-2-style byte-level BPE uses for the 256 byte values."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def qwen_byte_tokenizer():
    """A Qwen2 tokenizer over the 256 byte-level symbols plus Qwen's chat and vision specials.

    Returns:
        A ``Qwen2Tokenizer`` of 263 tokens; eos ``<|im_end|>``, pad ``<|endoftext|>``.
    """
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(
        vocab={c: i for i, c in enumerate(_gpt2_byte_alphabet())},
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_tokens(QWEN_SPECIAL_TOKENS, special_tokens=True)
    return tok
