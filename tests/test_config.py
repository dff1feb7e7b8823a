from __future__ import annotations

import json

import pytest

from crop.config import CropConfig


def test_round_trip():
    cfg = CropConfig(method="plc", keep_tokens=64, layer=3, grid=8, pool=2)
    assert CropConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "fastest"}, "unknown method"),
    ({"keep_tokens": 0}, "keep_tokens"),
    ({"keep_tokens": 3.5}, "keep_tokens"),
    ({"keep_tokens": True}, "keep_tokens"),
    ({"layer": 0}, "layer"),
    ({"grid": 0}, "grid"),
    ({"pool": 0}, "pool"),
    ({"score": "vibes"}, "score"),
])
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CropConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown CropConfig keys: budget"):
        CropConfig.from_dict({"budget": 64})
