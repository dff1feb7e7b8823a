"""crop's DivPrune against an independent re-implementation of the paper's selection rule.

``paper_rule`` below is written from the DivPrune paper (Ranjbar Alvar et al., CVPR 2025,
arXiv 2503.02175, Sec. 3 and Algorithm 1), not from code (the official code's licence is
non-commercial and it was not read), and calls nothing of crop's: the full cosine-distance matrix
of the visual tokens as the LLM receives them, the first token with the largest distance to its
nearest other token, then greedily the token whose minimum distance to the chosen set is largest.
It runs on a seeded random model with LLaVA-1.5 geometry (336 px / 14 px: 576 visual tokens), on a
batch of two images, with the projected features read off the stock model's LLM input.
"""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_method
from crop.methods import build_config, config_from_dict
from crop.methods import divprune as divprune_module
from crop.methods.divprune import DivPruneConfig, max_min_diverse
from crop.models.tiny import build_tiny_llava
from tests.conftest import chat_inputs, random_image

IMAGES = [random_image(51, (400, 300)), random_image(52, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]
V = 576


def paper_rule(x: torch.Tensor, m: int, first: str = "isolated") -> list[int]:
    """The greedy MMDP solution of the paper, in plain loops: sorted indices of ``m`` of the ``(n, D)`` tokens ``x``."""
    x = x.float()
    norms = x.norm(dim=1)
    dist = 1 - (x @ x.T) / (norms[:, None] * norms[None, :])  # (n, n) cosine distance
    n = x.shape[0]
    if first == "isolated":  # argmax_i min_{j != i} d(i, j)
        off_diagonal = dist + torch.diag(torch.full((n,), float("inf")))
        chosen = [int(off_diagonal.min(dim=1).values.argmax())]
    else:
        chosen = [0]
    while len(chosen) < m:
        rest = [i for i in range(n) if i not in chosen]
        score = dist[rest][:, chosen].min(dim=1).values  # each candidate's distance to the chosen set
        chosen.append(rest[int(score.argmax())])
    return sorted(chosen)


@pytest.fixture(scope="module")
def setup():
    with torch.no_grad():
        model, proc = build_tiny_llava(seed=3)
        inputs = chat_inputs(proc, IMAGES, QUESTIONS)
        rows, _, _ = _llm_image_rows(model, None, inputs)  # the stock model's projected image features
        assert [r.shape[0] for r in rows] == [V, V]
        return model, inputs, rows


def _llm_image_rows(model, config, inputs):
    """Run the LLM (stock with ``config=None``): (the image rows of its input embeddings per sample, stats, run)."""
    embeds = []
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: embeds.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        if config is None:
            run, stats = dict(inputs), None
            model(**run)
        else:
            with apply_method(model, config) as h:
                run = h.prepare(inputs)
                model(**run)
                stats = h.stats
    finally:
        hook.remove()
    image_id = model.config.image_token_id
    return [embeds[0][i][run["input_ids"][i] == image_id] for i in range(len(IMAGES))], stats, run


@pytest.mark.parametrize("budget", [64, 128, 192])
def test_keeps_the_papers_set_at_64_128_192_of_576(setup, budget):
    model, inputs, features = setup
    with torch.no_grad():
        rows, stats, run = _llm_image_rows(model, DivPruneConfig(keep_tokens=budget), inputs)
    assert "position_ids" not in run  # LLaVA: the kept tokens enter at consecutive positions
    assert stats.visual_tokens_kept["llm_input"] == [budget, budget]
    for i, got in enumerate(rows):
        want = paper_rule(features[i], budget)
        assert stats.full_resolution[i] == want
        torch.testing.assert_close(got, features[i][want])  # copies of the kept tokens, in image order


def test_first_token_variant(setup):
    model, inputs, features = setup
    with torch.no_grad():
        _, stats, _ = _llm_image_rows(model, DivPruneConfig(keep_tokens=64, first="index"), inputs)
    for i in range(len(IMAGES)):
        assert stats.full_resolution[i] == paper_rule(features[i], 64, first="index")
    assert stats.full_resolution[0] != paper_rule(features[0], 64)  # the option really changes the set


def test_blocked_distances_pick_the_same_tokens(setup, monkeypatch):
    _, _, features = setup
    whole = max_min_diverse(features[0], 64)
    monkeypatch.setattr(divprune_module, "_BLOCK_ENTRIES", 7 * V)  # 7 rows per block, the last one ragged
    assert torch.equal(max_min_diverse(features[0], 64), whole)


def test_the_chosen_set_is_more_diverse_than_random_ones(setup):
    _, _, features = setup
    x = torch.nn.functional.normalize(features[0].float(), dim=1)

    def spread(index):  # the MMDP objective: the smallest pairwise distance in the set
        d = 1 - x[index] @ x[index].T
        return (d + torch.diag(torch.full((len(index),), float("inf")))).min()

    generator = torch.Generator().manual_seed(0)
    chosen = spread(max_min_diverse(features[0], 64))
    assert all(chosen > spread(torch.randperm(V, generator=generator)[:64]) for _ in range(20))


def test_small_inputs_and_keep_all():
    tokens = torch.randn(5, 8)
    assert max_min_diverse(tokens, 5).tolist() == [0, 1, 2, 3, 4]
    assert max_min_diverse(tokens, 9).tolist() == [0, 1, 2, 3, 4]
    assert max_min_diverse(tokens, 1, first="index").tolist() == [0]
    same = torch.ones(4, 3)  # all distances 0: ties go to the lowest index
    assert max_min_diverse(same, 2).tolist() == [0, 1]


def test_config_round_trip_and_build():
    config = DivPruneConfig(keep_tokens=128, first="index")
    assert config_from_dict(config.to_dict()) == config
    assert build_config("divprune", 64, ["first=index"]) == DivPruneConfig(keep_tokens=64, first="index")
    assert build_config("divprune", None).keep_tokens is None


@pytest.mark.parametrize("field,value", [("keep_tokens", 0), ("keep_tokens", -3), ("keep_tokens", True),
                                         ("keep_tokens", 1.5), ("first", "random"), ("first", None)])
def test_bad_options_raise(field, value):
    with pytest.raises(ValueError, match=field):
        DivPruneConfig(**{field: value})


def test_bad_calls_raise():
    with pytest.raises(ValueError, match="ratio"):
        build_config("divprune", 64, ["ratio=0.5"])  # not a field of divprune
    with pytest.raises(ValueError, match="first"):
        max_min_diverse(torch.randn(4, 3), 2, first="last")
    with pytest.raises(ValueError, match="k must be"):
        max_min_diverse(torch.randn(4, 3), 0)
