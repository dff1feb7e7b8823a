"""The code-built tokenizers: exact round trips, one token per benchmark word, two per grid box."""

from __future__ import annotations

import pytest

from crop.models.tokenizers import (
    BENCHMARK_WORDS,
    grid_corner_tokens,
    qwen_byte_tokenizer,
    qwen_word_tokenizer,
)


@pytest.fixture(scope="module")
def words_tok():
    return qwen_word_tokenizer()


def _benchmark_text(n: int = 40) -> list[str]:
    from crop.data.synth import generate, scene_questions
    from crop.localizers.prompt import localizer_prompt

    texts = []
    for s in generate(n, seed=3, split="val"):
        texts += [localizer_prompt(q) for _, q, _, _ in scene_questions(s.objects, 336)]
    return texts


def test_every_benchmark_word_is_one_token(words_tok):
    texts = _benchmark_text()
    words = {w.strip("?:.,[]") for t in texts for w in t.split()} - {""}
    alpha = sorted(w for w in words if w.isalpha())
    assert {"star", "circles", "purple", "left", "Which", "region"} <= set(alpha)
    for w in alpha:
        assert len(words_tok.tokenize(" " + w)) == 1, w
        assert len(words_tok.tokenize(w)) == 1, w


def test_word_tokenizer_round_trips_anything(words_tok):
    for text in [*_benchmark_text(4), "Where is the zebra? Ünïcode ☃ stars!", "[3, 6, 4, 7]", "  two  spaces\n"]:
        ids = words_tok(text, add_special_tokens=False)["input_ids"]
        assert words_tok.decode(ids) == text


def test_word_tokenizer_is_deterministic_and_shorter(words_tok):
    again = qwen_word_tokenizer()
    assert again.get_vocab() == words_tok.get_vocab()
    text = "Which region of the image is needed to answer the question? What color is the star?"
    n_words = len(words_tok(text)["input_ids"])
    n_bytes = len(qwen_byte_tokenizer()(text)["input_ids"])
    assert n_words <= 18 and n_bytes >= 4 * n_words
    # specials keep their ids' meaning
    for t in ("<|im_end|>", "<|image_pad|>", "<|vision_start|>"):
        assert words_tok.convert_ids_to_tokens(words_tok.convert_tokens_to_ids(t)) == t
    assert len(BENCHMARK_WORDS) == len(set(BENCHMARK_WORDS))


def test_qwen_shape_selects_tokenizer():
    from crop.models.tiny import QwenShape, qwen_config, qwen_processor, qwen_tokenizer

    shape = QwenShape(tokenizer="words")
    assert qwen_config("qwen2_vl", shape).text_config.vocab_size == len(qwen_processor("qwen2_vl", shape).tokenizer)
    assert len(qwen_tokenizer("words")) > len(qwen_tokenizer("bytes"))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        qwen_tokenizer("sentencepiece")


def test_corner_tokens_make_every_box_two_tokens(words_tok):
    from crop.localizers.prompt import format_box

    tok = qwen_word_tokenizer(box_grid=8)
    assert len(grid_corner_tokens(8)) == 128 and len(tok) == len(words_tok) + 128
    for box in [(0, 0, 7, 7), (3, 6, 4, 7), (1, 2, 1, 2), (7, 0, 7, 3)]:
        text = format_box(box)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == [f"[{box[0]}, {box[1]},", f" {box[2]}, {box[3]}]"]
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    # text without a box encodes as with the word tokenizer (same ids: the corners come last)
    for text in _benchmark_text(4):
        assert tok(text)["input_ids"] == words_tok(text)["input_ids"]
