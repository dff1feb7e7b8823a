from __future__ import annotations

import json

import pytest

from crop.config import CropILPConfig, CropPLCConfig, NoPruningConfig
from crop.methods import METHODS, build_config, config_from_dict, method_for, method_names


@pytest.mark.parametrize("name", method_names())
def test_every_config_round_trips_through_its_dict(name):
    cfg = build_config(name, 64)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["method"] == name
    rebuilt = config_from_dict(data)
    assert rebuilt == cfg and type(rebuilt) is type(cfg)
    assert method_for(rebuilt) is METHODS.get(name)


def test_aliases_are_translated_once():
    assert config_from_dict({"method": "ilp", "keep_tokens": 64}) == CropILPConfig(keep_tokens=64)
    assert type(build_config("plc", 32)) is CropPLCConfig
    assert type(build_config("full")) is NoPruningConfig


def test_config_from_dict_errors():
    with pytest.raises(ValueError, match="needs a 'method' key"):
        config_from_dict({"keep_tokens": 64})
    with pytest.raises(ValueError, match="unknown method 'fastest'"):
        config_from_dict({"method": "fastest"})
    with pytest.raises(ValueError, match="not 'crop-plc'"):
        CropILPConfig.from_dict({"method": "crop-plc"})


def test_each_method_has_its_own_config_class():
    classes = [METHODS.get(n).config_class for n in method_names()]
    assert len(set(classes)) == len(classes)
    with pytest.raises(ValueError, match="must both be"):  # a config class selects one method
        METHODS.register("crop-ilp-copy")(type("Copy", (METHODS.get("crop-ilp"),), {"name": "crop-ilp-copy"}))


@pytest.mark.parametrize("cls,kwargs,message", [
    (CropILPConfig, {"keep_tokens": 0}, "keep_tokens"),
    (CropILPConfig, {"keep_tokens": 3.5}, "keep_tokens"),
    (CropILPConfig, {"keep_tokens": True}, "keep_tokens"),
    (CropILPConfig, {"layer": 0}, "layer"),
    (CropILPConfig, {"grid": 0}, "grid"),
    (CropPLCConfig, {"pool": 0}, "pool"),
    (CropPLCConfig, {"grid": 65}, "grid"),
])
def test_validation(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown CropILPConfig keys: budget"):
        CropILPConfig.from_dict({"budget": 64})
    with pytest.raises(ValueError, match="unknown CropPLCConfig keys: layer"):
        CropPLCConfig.from_dict({"layer": 2})
