from __future__ import annotations

import pytest
import torch

from crop.ops.pooling import count_pooled, pool_outside
from crop.ops.selection import select_tokens
from crop.ops.sequences import find_runs, resize_runs
from crop.regions import GridBox


def test_select_exact_region_without_budget():
    box = GridBox(2, 2, 5, 5)
    assert torch.equal(select_tokens(box, 24, 24, None), box.token_indices(24, 24))


@pytest.mark.parametrize("budget", [1, 9, 64, 128, 144, 192, 500, 576, 1000])
def test_select_meets_budget_exactly(budget):
    box = GridBox(2, 2, 5, 5)  # 144 tokens
    keep = select_tokens(box, 24, 24, budget)
    assert keep.numel() == min(budget, 576)
    assert keep.unique().numel() == keep.numel() and torch.equal(keep, keep.sort().values)


def test_select_trims_inside_region_and_grows_symmetrically():
    box = GridBox(3, 3, 4, 4)  # 6x6 = 36 tokens at rows/cols 9..14
    small = select_tokens(box, 24, 24, 16)
    assert torch.isin(small, box.token_indices(24, 24)).all()
    rows, cols = small // 24, small % 24
    assert rows.float().mean() == pytest.approx(11.5) and cols.float().mean() == pytest.approx(11.5)  # centred
    big = select_tokens(box, 24, 24, 100)
    assert torch.isin(box.token_indices(24, 24), big).all()  # region kept whole
    assert torch.isin(big, box.grow(1).token_indices(24, 24)).all()  # growth by one ring is enough
    rows, cols = big // 24, big % 24
    assert rows.float().mean() == pytest.approx(11.5, abs=0.3) and cols.float().mean() == pytest.approx(11.5, abs=0.3)


def test_select_rejects_bad_budget():
    with pytest.raises(ValueError):
        select_tokens(GridBox.full(), 24, 24, 0)


def test_pool_outside_values_and_order():
    feats = torch.arange(16, dtype=torch.float32)[:, None].repeat(1, 2)  # (16, 2) on a 4x4 grid
    keep = torch.tensor([0, 1, 4, 5])  # the top-left 2x2 block
    tokens, source = pool_outside(feats, 4, 4, keep, 2)
    # kept 0,1,4,5 + pooled blocks: top-right (2,3,6,7), bottom-left (8,9,12,13), bottom-right (10,11,14,15)
    assert source.tolist() == [0, 1, 2, 4, 5, 8, 10]
    assert tokens[:, 0].tolist() == [0, 1, 4.5, 4, 5, 10.5, 12.5]
    assert count_pooled(4, 4, keep, 2) == 3


def test_pool_outside_partial_block_and_keep_all():
    feats = torch.randn(36, 3)
    keep = torch.arange(36)
    tokens, source = pool_outside(feats, 6, 6, keep, 4)
    assert torch.equal(tokens, feats) and torch.equal(source, keep)
    tokens, _ = pool_outside(feats, 6, 6, torch.tensor([0]), 4)  # 6x6 in 4x4 blocks -> 4 blocks (ceil)
    assert tokens.shape == (1 + 4, 3)
    assert torch.allclose(tokens[1], feats[[1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21]].mean(0))


def test_find_runs_and_resize_runs():
    ids = torch.tensor([[5, 9, 9, 9, 6, 9, 9, 7], [0, 5, 9, 9, 9, 6, 6, 7]])
    assert find_runs(ids[0], 9) == [(1, 3), (5, 2)]
    mask = torch.tensor([[1] * 8, [0] + [1] * 7])
    new_ids, new_mask, src, starts = resize_runs(ids, mask, [[(1, 3), (5, 2)], [(2, 3)]], [[1, 4], [2]], 9, 0)
    assert new_ids[0].tolist() == [5, 9, 6, 9, 9, 9, 9, 7]
    assert new_ids[1].tolist() == [0, 0, 5, 9, 9, 6, 6, 7]
    assert new_mask[1].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert starts == [[1, 3], [3]]
    assert src[0].tolist() == [0, -1, 4, -1, -1, -1, -1, 7]


def test_stride_trim_covers_the_whole_region():
    from crop.ops.selection import select_tokens
    from crop.regions import GridBox

    full = GridBox(0, 0, 7, 7)
    center = select_tokens(full, 16, 16, 28)
    stride = select_tokens(full, 16, 16, 28, trim="stride")
    assert center.numel() == stride.numel() == 28 and stride.unique().numel() == 28
    rows = lambda idx: set((idx // 16).tolist())  # noqa: E731
    assert len(rows(stride)) > 12 and len(rows(center)) <= 6  # coverage vs a central blob
    assert stride[0] == 0 and stride[-1] == 255
    # a region smaller than the budget grows the same way under both
    small = GridBox(2, 2, 3, 3)
    assert torch.equal(select_tokens(small, 16, 16, 40), select_tokens(small, 16, 16, 40, trim="stride"))
    with pytest.raises(ValueError, match="unknown trim"):
        select_tokens(full, 16, 16, 28, trim="random")
