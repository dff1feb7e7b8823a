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
# The same roles, but a user turn with an image renders its text, the image, then its text again:
# "USER: q\n<image>\nq ASSISTANT:". In a causal LLM the image tokens then see the question (the
# embedded answerer is trained so), and the question still follows the image for methods that
# rate visual tokens by the attention of later text tokens.
LLAVA_QUESTION_FIRST_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% set texts = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') %}"
    "{% if m['content'] | selectattr('type', 'equalto', 'image') | list %}{{ texts }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% endif %}{{ texts }}"
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


def gpt2_byte_alphabet() -> list[str]:
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
        vocab={c: i for i, c in enumerate(gpt2_byte_alphabet())},
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_tokens(QWEN_SPECIAL_TOKENS, special_tokens=True)
    return tok


# Words a toy model trained on this repository's benchmark meets: the question templates, the
# shapes/colours/directions they name, the localizer prompt and the chat template's roles. A
# word outside this list still encodes (byte-level fallback), just into more tokens.
BENCHMARK_WORDS: tuple[str, ...] = (
    "What", "color", "is", "the", "number", "on", "card", "shape", "left", "right", "of", "How", "many",
    "are", "there", "circle", "circles", "square", "squares", "triangle", "triangles", "star", "stars",
    "red", "green", "blue", "yellow", "purple", "a", "Which", "region", "image", "needed", "to", "answer",
    "question", "Answer", "with", "box", "grid", "as", "Question", "x", "y", "user", "assistant", "system",
)


def _learn_word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make every word in ``words`` a single token, learned by simulation.

    Classic BPE training on the word list (each word counted once): repeatedly merge the most
    frequent adjacent pair (ties broken by the pair's text, so the result is deterministic)
    until no word has two pieces left. Because the merges are learned by simulating BPE, the
    tokenizer that applies them in rank order reproduces exactly these segmentations.
    """
    pieces = [list(w) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for p in pieces:
            for pair in zip(p, p[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for k, p in enumerate(pieces):
            out, i = [], 0
            while i < len(p):
                if i + 1 < len(p) and (p[i], p[i + 1]) == best:
                    out.append(p[i] + p[i + 1])
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            pieces[k] = out


def grid_corner_tokens(grid: int) -> list[str]:
    """The two halves of every grid box's text, ``"[x0, y0,"`` and ``" x1, y1]"``, one per cell each.

    ``format_box`` writes a box as ``"[x0, y0, x1, y1]"``; with these as tokens that text is two
    tokens, its top-left and its bottom-right cell (the location-token idea of Pix2Seq and
    Kosmos-2, kept readable), instead of twelve digit and punctuation pieces.
    """
    cells = [(x, y) for y in range(grid) for x in range(grid)]
    return [f"[{x}, {y}," for x, y in cells] + [f" {x}, {y}]" for x, y in cells]


def qwen_word_tokenizer(words: tuple[str, ...] = BENCHMARK_WORDS, box_grid: int | None = None):
    """The Qwen2 byte-level tokenizer plus BPE merges that make each of ``words`` one token.

    Each word is learned both bare and after a space (``Ġword``), as the Qwen2 pre-tokenizer
    splits text. Prompts of a toy model become about a quarter as long as with bytes alone,
    which shortens its prefill and keeps its question close to the image tokens.

    Args:
        words: words that become single tokens.
        box_grid: if given, the :func:`grid_corner_tokens` of this grid are added (as plain,
            non-special tokens matched before pre-tokenization), so a localizer decodes a box
            in two steps instead of twelve.

    Returns:
        A ``Qwen2Tokenizer``; eos ``<|im_end|>``, pad ``<|endoftext|>``.
    """
    from transformers import AddedToken, Qwen2Tokenizer

    alphabet = gpt2_byte_alphabet()
    space = "\u0120"  # "Ġ": the byte-level symbol of a space
    merges = _learn_word_merges(sorted({w for word in words for w in (word, space + word)}))
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    # Qwen2Tokenizer annotates merges as strings and unk_token as str, but hands both to the tokenizers
    # BPE, which takes (left, right) merge pairs and None for "no unknown token"
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None,  # type: ignore[arg-type]
                         bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens(QWEN_SPECIAL_TOKENS, special_tokens=True)
    if box_grid is not None:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in grid_corner_tokens(box_grid)])
    return tok
