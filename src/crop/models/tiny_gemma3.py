"""A seeded random Gemma 3 VLM (``Gemma3ForConditionalGeneration``) with real geometry and tiny widths.

Real geometry: an 896 px SigLIP view cut into 14 px patches (a 64x64 patch grid), average-pooled
4x4 into the 16x16 = 256 tokens every Gemma 3 image becomes, framed by ``<start_of_image>`` /
``<end_of_image>``; a language model whose layers interleave sliding-window and global attention
(``layer_types``) and whose image tokens attend to each other both ways. Widths and depths are tiny
and the weights random, so its answers are gibberish by construction.

The sliding window is a parameter: the registered ``tiny-random-gemma3`` uses 512 tokens, wider
than the one-image prompts of the test matrix (about 290 tokens), like the real checkpoints' 1024
over a one-image prompt, so cached decoding after inner-LLM pruning works there. Tests that need
the window to bite build the same model with a window of a few tokens.
"""

from __future__ import annotations

from typing import Any

import torch

GEMMA3_SPECIAL_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                         "image_token": "<image_soft_token>"}
# Gemma 3's turn format: "<bos><start_of_turn>user\n<start_of_image>q<end_of_turn>\n<start_of_turn>model\n"
# (the processor expands <start_of_image> into "\n\n<start_of_image>" + 256 soft tokens + "<end_of_image>\n\n")
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Gemma 3 interleaves sliding and global layers (five to one in the checkpoints). Here one of each runs before
# the default pruning layer K = 2 (transformers sizes each kind's decode mask on the first layer of that kind,
# which must stay unpruned for cached decoding after pruning), and eight layers put multi-stage methods'
# first stage (PyramidDrop: a quarter of the depth) at layer 2 as well
_S, _F = "sliding_attention", "full_attention"
TINY_LAYER_TYPES = (_S, _F, _S, _S, _F, _S, _S, _F)
TINY_SLIDING_WINDOW = 512


def gemma3_byte_tokenizer():
    """A Gemma tokenizer over bytes with Gemma 3's chat and image specials, built in code.

    Returns:
        A ``GemmaTokenizer``: ``<pad> <eos> <bos> <unk> <mask>``, 256 byte-fallback tokens, ``▁`` and
        ASCII, then ``<start_of_image> <end_of_image> <image_soft_token>`` (exposed as
        ``boi_token``/``eoi_token``/``image_token``, as the processor reads them) and the turn markers.
    """
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["▁"] + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(ch, len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=[], extra_special_tokens=dict(GEMMA3_SPECIAL_TOKENS))
    tok.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    return tok


def _flat_images_processor_class():
    """``Gemma3Processor`` that also takes a flat image list for a batch of prompts (one image per marker, in order).

    The stock processor reads a flat list as the images of *one* prompt, while every other
    processor here (and so the pipeline, evaluation and benchmark code) passes one flat list for
    the batch; this subclass splits it by each prompt's ``<start_of_image>`` count first.
    """
    from transformers import Gemma3Processor

    class Gemma3BatchProcessor(Gemma3Processor):
        def prepare_inputs_layout(self, images=None, text=None, **kwargs):
            if isinstance(images, (list, tuple)) and images and not isinstance(images[0], (list, tuple)) \
                    and isinstance(text, (list, tuple)) and len(text) > 1:
                counts = [t.count(self.boi_token) for t in text]
                if sum(counts) == len(images):
                    nested, start = [], 0
                    for n in counts:
                        nested.append(list(images[start:start + n]))
                        start += n
                    images = nested
            return super().prepare_inputs_layout(images=images, text=text, **kwargs)

    return Gemma3BatchProcessor


def gemma3_batch_processor(processor):
    """``processor`` (a stock ``Gemma3Processor``, e.g. a hub checkpoint's) rebuilt as the batch-taking subclass above."""
    return _flat_images_processor_class()(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                          chat_template=processor.chat_template,
                                          image_seq_length=processor.image_seq_length)


def gemma3_processor(image_size: int = 896, tokens_per_image: int = 256):
    """A Gemma 3 processor: PIL image backend (resize to ``image_size`` square), the byte tokenizer, the chat template."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size},
                                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return _flat_images_processor_class()(image_processor=image_processor, tokenizer=gemma3_byte_tokenizer(),
                                          chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=tokens_per_image)


def gemma3_config(sliding_window: int = TINY_SLIDING_WINDOW, layer_types: tuple[str, ...] = TINY_LAYER_TYPES,
                  image_size: int = 896, patch_size: int = 14, tokens_per_image: int = 256):
    """A ``Gemma3Config``: SigLIP at ``image_size``/``patch_size``, ``tokens_per_image`` pooled tokens, a tiny LM.

    Args:
        sliding_window: the sliding layers' window (tokens).
        layer_types: one ``"sliding_attention"`` / ``"full_attention"`` per LM layer.
    """
    from transformers import Gemma3Config

    tok = gemma3_byte_tokenizer()
    text: dict[str, Any] = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=sliding_window, layer_types=list(layer_types), max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    vision = dict(model_type="siglip_vision_model", image_size=image_size, patch_size=patch_size, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
                        boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                        image_token_index=tok.image_token_id)


def build_tiny_gemma3(seed: int = 0, attn_implementation: str = "sdpa", sliding_window: int = TINY_SLIDING_WINDOW,
                      layer_types: tuple[str, ...] = TINY_LAYER_TYPES):
    """A seeded random ``Gemma3ForConditionalGeneration`` and its processor.

    The projector's weight is drawn at random too: stock initialisation zeroes it, which would feed
    the LM all-zero image tokens and hide every pruning effect.

    Args:
        seed: torch seed for the weights.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        sliding_window: the sliding layers' window (tokens).
        layer_types: the LM's layer kinds, in order.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    from transformers import Gemma3ForConditionalGeneration

    config = gemma3_config(sliding_window, layer_types)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        weight = model.get_submodule("model.multi_modal_projector").mm_input_projection_weight  # (P, D)
        weight.normal_(0.0, float(weight.shape[0]) ** -0.5)
    model.set_attn_implementation(attn_implementation)
    return model, gemma3_processor()
