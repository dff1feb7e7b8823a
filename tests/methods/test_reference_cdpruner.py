"""crop's CDPruner against an independent re-implementation of the official LLaVA-1.5 rule.

``official_*`` below is rewritten from Theia-4869/CDPruner at commit
9541616c40fcd5625de1cdb8ea6c33c129eb7864, without calling crop's code:
``llava/model/multimodal_encoder/clip_encoder.py`` L38-48 (the text tower and ``visual_projection``
of the tower's CLIP checkpoint) and L79-96 (the question in 77-token segments; the image side is
``hidden_states[-2]`` patches through the tower's ``post_layernorm`` and ``visual_projection``),
``llava/model/llava_arch.py`` L141-185 (similarity of the projected features, relevance, kernel,
fast greedy MAP inference, sorted picks), one image per call as its evaluation runs it
(``llava/eval/model_vqa_loader.py`` L104-126, ``texts=question``). It runs on a seeded random
model with LLaVA-1.5 geometry (336 px / 14 px: 576 patches) whose projector is wide enough (640)
for a full-rank kernel at 192 picks, and a seeded random CLIP checkpoint as the text encoder.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from crop.api import apply_method, check_config
from crop.embedded import build_from_shape
from crop.methods import build_config
from crop.methods.cdpruner import CDPrunerConfig
from crop.models import get_adapter
from tests.conftest import chat_inputs, random_clip_text_encoder, random_image, saved_llama_tokenizer, tiny

IMAGES = [random_image(31, (400, 300)), random_image(32, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]
SHAPE = dict(image_size=336, patch_size=14, vision_hidden=128, vision_layers=3, text_hidden=640, text_layers=1,
             text_heads=4, text_kv_heads=4, text_intermediate=64)


def official_text_embeds(folder: str, question: str) -> torch.Tensor:
    """clip_encoder.py L81-89: the question untruncated, zero-padded to whole 77-token segments, ``text_embeds`` ``(M, C)``."""
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tower = CLIPTextModelWithProjection.from_pretrained(folder)
    inputs = tokenizer(text=question, return_tensors="pt")
    length = tower.config.max_position_embeddings
    segments = (inputs.input_ids.shape[1] - 1) // length + 1
    padding = length * segments - inputs.input_ids.shape[1]
    inputs = {k: torch.cat([v, v.new_zeros((v.shape[0], padding))], dim=1).reshape(-1, length) for k, v in inputs.items()}
    return tower(**inputs).text_embeds


def official_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor, sign: float = -1.0) -> torch.Tensor:
    """llava_arch.py L156-160: minus the mean cosine to the text segments, min-max normalised with +1e-6. ``(N,)``."""
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (sign * (image_embeds @ text_embeds.t())).mean(dim=-1)
    return (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())


def official_keep(features: torch.Tensor, relevance: torch.Tensor, count: int) -> list[int]:
    """llava_arch.py L150-185 for one image (B = 1): cosine kernel conditioned on relevance, greedy MAP, sorted picks."""
    features = features[None]  # (1, N, D)
    relevance = relevance[None]  # (1, N)
    b, n, _ = features.shape
    unit = (features / features.norm(dim=-1, keepdim=True)).float()
    kernel = relevance.unsqueeze(2) * torch.matmul(unit, unit.transpose(1, 2)) * relevance.unsqueeze(1)  # (1, N, N)
    cis = torch.zeros((count, b, n))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select = torch.empty((count, b), dtype=torch.long)
    rows = torch.arange(b)
    for i in range(count):
        j = torch.argmax(di2s, dim=-1)
        select[i] = j
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / torch.sqrt(di2s[rows, j]).unsqueeze(-1)
        cis[i] = eis
        di2s -= torch.square(eis)
        di2s[rows, j] = -float("inf")
    assert torch.isfinite(cis).all()  # the official loop stayed well defined (a full-rank kernel)
    return torch.sort(select.t()).values[0].tolist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, its inputs, a CLIP folder whose post-layernorm is non-trivial (the model's tower gets the same one)."""
    with torch.no_grad():
        torch.manual_seed(0)
        model, proc = build_from_shape("llava", SHAPE)
        folder = str(tmp_path_factory.mktemp("clip"))
        clip = CLIPModel.from_pretrained(random_clip_text_encoder(SHAPE["vision_hidden"]))
        norm = clip.vision_model.post_layernorm
        norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
        norm.bias.copy_(0.3 * torch.randn_like(norm.bias))
        clip.save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f"{random_clip_text_encoder(SHAPE['vision_hidden'])}/{name}", folder)
        # the official reads the LLaVA tower's own post_layernorm; LLaVA never trains it (it is not on the path of
        # hidden_states[-2]), so in a real checkpoint it is the CLIP checkpoint's: the same weights here
        tower = model.model.vision_tower
        tower_norm = getattr(tower, "vision_model", tower).post_layernorm  # transformers 5 flattens CLIPVisionModel
        tower_norm.load_state_dict(norm.state_dict())
        inputs = chat_inputs(proc, IMAGES, QUESTIONS)
        hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        features = model.model.multi_modal_projector(hidden)  # llava_arch.py L148: (B, 576, 640)
        projection = CLIPVisionModelWithProjection.from_pretrained(folder).visual_projection  # clip_encoder.py L41-42
        image_embeds = projection(tower_norm(hidden).float())  # L94-95
        text_embeds = [official_text_embeds(folder, q) for q in QUESTIONS]
        return model, inputs, folder, features, image_embeds, text_embeds


def _kept(model, config, inputs):
    with torch.no_grad(), apply_method(model, config) as handle:
        run = handle.prepare(inputs)
        return handle.stats, run


@pytest.mark.parametrize("budget", [64, 128, 192])
def test_matches_the_official_llava_rule(setup, budget):
    model, inputs, folder, features, image_embeds, text_embeds = setup
    config = CDPrunerConfig(keep_tokens=budget, text_encoder=folder, tokenizer=saved_llama_tokenizer())
    stats, run = _kept(model, config, inputs)
    assert "position_ids" not in run  # consecutive positions, image order, as the official prompt
    assert stats.visual_tokens_kept["llm_input"] == [budget, budget]
    for i in range(len(IMAGES)):
        with torch.no_grad():
            want = official_keep(features[i], official_relevance(image_embeds[i], text_embeds[i]), budget)
        assert stats.full_resolution[i] == want


def test_theta_option_is_the_commented_out_exponential(setup):
    model, inputs, folder, features, image_embeds, text_embeds = setup
    config = CDPrunerConfig(keep_tokens=64, text_encoder=folder, tokenizer=saved_llama_tokenizer(), theta=0.5)
    stats, _ = _kept(model, config, inputs)
    alpha = 0.5 / (2 * (1 - 0.5))  # llava_arch.py L164-166
    for i in range(len(IMAGES)):
        with torch.no_grad():
            relevance = torch.exp(alpha * official_relevance(image_embeds[i], text_embeds[i]))
            assert stats.full_resolution[i] == official_keep(features[i], relevance, 64)


def test_the_question_conditions_the_choice(setup):
    model, _, folder, _, _, _ = setup
    _, proc = build_from_shape("llava", SHAPE)
    config = CDPrunerConfig(keep_tokens=64, text_encoder=folder, tokenizer=saved_llama_tokenizer())
    one = chat_inputs(proc, [IMAGES[0], IMAGES[0]], ["What color is the star?", "Is there a red square on the left?"])
    stats, _ = _kept(model, config, one)
    assert stats.full_resolution[0] != stats.full_resolution[1]
    # the instruction the CLIP tokenizer sees: the question, without the chat template around it
    with apply_method(model, config) as handle:
        assert handle.method._instructions(one, get_adapter(model).image_spans(one)) == \
            ["What color is the star?", "Is there a red square on the left?"]


def test_qwen_fallback_is_the_same_rule_on_the_llm_input_embeddings():
    """Qwen2-VL has no CLIP text tower: relevance = +cos between the projected tokens and the LLM's embeddings of the
    instruction's tokens (the text after the image), min-max normalised; then the official DPP."""
    model, proc = tiny("tiny-random-qwen2-vl")
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    spans = get_adapter(model).image_spans(inputs)
    budget = 24
    stats, _ = _kept(model, build_config("cdpruner", budget), inputs)
    with torch.no_grad():
        grids = inputs["image_grid_thw"]
        per_image = model.model.get_image_features(inputs["pixel_values"], grids, return_dict=True).pooler_output
        skip = {model.config.image_token_id, model.config.video_token_id, model.config.vision_start_token_id,
                model.config.vision_end_token_id}
        for span, features in zip(spans, per_image, strict=True):
            ids, mask = inputs["input_ids"][span.sample], inputs["attention_mask"][span.sample]
            after = [int(t) for t, m in zip(ids[span.start + span.length:], mask[span.start + span.length:], strict=True)
                     if m and int(t) not in skip]
            text = model.get_input_embeddings()(torch.tensor(after))
            want = official_keep(features, official_relevance(features, text, sign=1.0), budget)
            assert stats.full_resolution[spans.index(span)] == want


def test_exactly_the_budget_when_the_kernel_rank_runs_out():
    # 64-wide features: rank <= 64, so 300 picks exhaust it (the official loop would pick tokens twice)
    model, proc = tiny("tiny-random-llava")
    stats, _ = _kept(model, build_config("cdpruner", 300), chat_inputs(proc, IMAGES, QUESTIONS))
    assert [len(set(k)) for k in stats.full_resolution] == [300, 300]


# -- options and errors --------------------------------------------------------------------------------


def test_a_missing_text_encoder_says_what_to_give_in_one_line():
    with pytest.raises(ValueError, match="needs text_encoder") as err:
        CDPrunerConfig(relevance="clip")
    assert "\n" not in str(err.value) and "openai/clip-vit-large-patch14-336" in str(err.value)
    with pytest.raises(ValueError, match="could not load text_encoder") as err:
        check_config(tiny("tiny-random-llava")[0], CDPrunerConfig(text_encoder="/nonexistent/clip"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"relevance": "attention"}, "unknown relevance"),
    ({"theta": 1.0}, "theta"),
    ({"theta": True}, "theta"),
    ({"negate": "yes"}, "negate"),
    ({"text_encoder": ""}, "text_encoder"),
    ({"tokenizer": 3}, "tokenizer"),
    ({"relevance": "llm", "text_encoder": "some/clip"}, "only read with"),
    ({"strip_suffixes": ("ASSISTANT:", "")}, "strip_suffixes"),
    ({"keep_tokens": 0}, "keep_tokens"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CDPrunerConfig(**kwargs)


def test_options_round_trip_and_parse_from_the_command_line():
    config = build_config("cdpruner", 64, ["text_encoder=openai/clip-vit-large-patch14-336", "theta=0.5",
                                           "strip_suffixes=ASSISTANT:"])
    assert config.strip_suffixes == ("ASSISTANT:",) and config.source() == "clip" and config.negated()
    assert CDPrunerConfig.from_dict(config.to_dict()) == config
    assert build_config("cdpruner", 64).source() == "llm" and not build_config("cdpruner", 64).negated()
    assert build_config("cdpruner", 64, ["relevance=off"]).source() == "off"


def test_what_clip_relevance_cannot_take_is_refused_up_front(setup):
    _, _, folder, _, _, _ = setup
    with pytest.raises(ValueError, match="needs a CLIP vision tower"):
        check_config(tiny("tiny-random-qwen2-vl")[0], CDPrunerConfig(text_encoder=folder))
    with pytest.raises(ValueError, match="128-wide vision side but the model's vision tower is 64 wide"):
        check_config(tiny("tiny-random-llava")[0], CDPrunerConfig(text_encoder=folder, tokenizer=saved_llama_tokenizer()))
    model, _ = build_from_shape("llava", SHAPE)  # built in code: no name_or_path to find its tokenizer
    with pytest.raises(ValueError, match="set tokenizer="):
        check_config(model, CDPrunerConfig(text_encoder=folder))
