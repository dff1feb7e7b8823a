"""The one config builder: (method name, budget, options) -> any method's config, read off its dataclass."""

from __future__ import annotations

import dataclasses

import pytest

from crop.config import CropILPConfig, CropSelfConfig, NoPruningConfig
from crop.methods import Option, build_config, check_options_used, config_builder, config_fields, method_names
from crop.methods.dart import DARTConfig
from crop.methods.fastv import FastVConfig
from crop.methods.self_region import for_self_localizer, self_localized_name

REGION_GUIDED = {"crop-ilp", "crop-plc", "crop-plc-trained", "crop-region", "crop-self"}


@pytest.mark.parametrize("name", method_names())
def test_every_method_builds_from_its_name_and_round_trips(name):
    options = [("crop-plc-trained", "compressor", "some/folder")]
    config = build_config(name, 32, options)
    assert config.method_name == name
    if "keep_tokens" in config_fields(name):
        assert config.keep_tokens == 32
    assert type(config).from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", method_names())
def test_grid_only_where_the_region_is_used(name):
    assert ("grid" in config_fields(name)) == (name in REGION_GUIDED)


def test_shared_settings_reach_only_the_methods_that_have_the_field():
    shared = {"layer": 3, "pool": 2, "seed": 5, "grid": 4}
    assert build_config("fastv", 16, shared=shared) == FastVConfig(keep_tokens=16, layer=3)
    assert build_config("crop-plc", 16, shared=shared).pool == 2
    assert build_config("random", 16, shared=shared).seed == 5
    assert build_config("crop-ilp", None, shared=shared) == CropILPConfig(layer=3, grid=4)
    assert build_config("full", 64, shared=shared) == NoPruningConfig()  # no budget: the number is not read


def test_options_are_parsed_applied_in_order_and_override_shared():
    config = build_config("dart", 64, ["budget=exact", Option("layer", "4"), ("dart", "image_pivots", 2)],
                          shared={"layer": 3})
    assert config == DARTConfig(keep_tokens=64, layer=4, image_pivots=2, budget="exact")
    assert build_config("pdrop", None, ["layers=2,6", "ratio=0.5"]).layers == (2, 6)


def test_an_option_aimed_at_another_method_does_not_reach_this_one():
    assert build_config("fastv", 8, ["dart.budget=exact", "crop-ilp.trim=stride"]) == FastVConfig(keep_tokens=8)
    assert build_config("ilp", 8, ["crop-ilp.trim=stride"]).trim == "stride"  # an alias is the method


def test_a_field_the_method_does_not_have_is_refused_with_the_fields_it_has():
    with pytest.raises(ValueError, match="fastv has no option trim; its options: keep_tokens, layer, drop"):
        build_config("fastv", 8, ["trim=stride"])
    with pytest.raises(ValueError, match="--pool does not apply to crop-ilp"):
        build_config("ilp", 8, [Option("pool", 2, source="--pool")])
    with pytest.raises(ValueError, match="fastv has no option grid"):
        build_config("fastv", 8, ["grid=4"])
    # in a run of several methods an unaimed field only has to fit one of them
    assert build_config("fastv", 8, ["trim=stride"], strict=False) == FastVConfig(keep_tokens=8)


def test_bad_values_names_and_syntax_are_value_errors():
    with pytest.raises(ValueError, match="unknown method"):
        build_config("fastvv", 8)
    with pytest.raises(ValueError, match="unknown method"):
        build_config("fastv", 8, ["nomethod.layer=1"])
    with pytest.raises(ValueError, match="layer"):
        build_config("fastv", 8, ["layer=0"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        Option.parse("budget")
    with pytest.raises(ValueError, match="keep_tokens"):
        build_config("crop-plc-trained", None)


def test_check_options_used_refuses_options_that_reach_no_method():
    check_options_used(["fastv", "crop-ilp"], ["trim=stride", "fastv.drop=0.3"])
    with pytest.raises(ValueError, match="ratio is not a field of any method run here"):
        check_options_used(["fastv", "crop-ilp"], ["ratio=0.3"])
    with pytest.raises(ValueError, match="no dart run here"):
        check_options_used(["fastv"], ["dart.budget=exact"])


def test_config_builder_is_build_config_at_each_budget():
    at = config_builder("crop-ilp", ["trim=stride"], {"layer": 1})
    assert [at(k) for k in (8, None)] == [CropILPConfig(keep_tokens=8, layer=1, trim="stride"),
                                          CropILPConfig(layer=1, trim="stride")]


def test_the_self_localizer_rule_lives_in_one_place():
    assert self_localized_name("ilp") == "crop-self"
    assert self_localized_name("crop-self") == "crop-self"
    assert self_localized_name("fastv") == "fastv"  # region-free: runs unchanged
    for name in ("crop-plc", "crop-plc-trained"):
        with pytest.raises(ValueError, match="needs the region before the LLM runs"):
            self_localized_name(name)
    ilp = CropILPConfig(keep_tokens=20, layer=3, grid=4, trim="stride")
    assert for_self_localizer(ilp, {"rule": "price"}) == CropSelfConfig(keep_tokens=20, layer=3, grid=4,
                                                                         trim="stride", rule="price")
    self_config = CropSelfConfig(keep_tokens=20)
    assert for_self_localizer(self_config) is self_config
    assert for_self_localizer(self_config, {"share": 0.5}) == dataclasses.replace(self_config, share=0.5)
    with pytest.raises(ValueError, match="needs the region before the LLM runs"):
        for_self_localizer(build_config("crop-plc", 20))
