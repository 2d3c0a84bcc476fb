"""Fp4Config: defaults, validation with clear errors, and building from torch.compile options."""

import dataclasses

import pytest

from fp4compile import Fp4Config


def test_defaults_are_valid_and_frozen():
    config = Fp4Config()
    assert (config.format, config.act_mode, config.scale_rule) == ("nvfp4", "none", "optimal")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.format = "mxfp4"  # type: ignore[misc]


def test_pattern_lists_become_tuples():
    config = Fp4Config(include=["model.layers.*"], exclude=("*.down_proj",))
    assert config.include == ("model.layers.*",) and config.exclude == ("*.down_proj",)
    assert hash(config) == hash(Fp4Config(include=("model.layers.*",), exclude=["*.down_proj"]))


def test_from_options_builds_and_rejects_unknown_keys_listing_the_valid_ones():
    assert Fp4Config.from_options({"format": "mxfp4", "act_mode": "fp4"}) == Fp4Config(format="mxfp4", act_mode="fp4")
    assert Fp4Config.from_options(None) == Fp4Config()
    with pytest.raises(ValueError, match=r"unknown fp4compile option\(s\) \['fromat'\]; valid options are \['format'"):
        Fp4Config.from_options({"fromat": "mxfp4"})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"format": "fp8"}, ValueError, "unknown fp4 format 'fp8'"),
        ({"format": 4}, TypeError, "Fp4Config.format must be a string"),
        ({"act_mode": "w4a4"}, ValueError, "unknown act_mode 'w4a4'"),
        ({"scale_rule": None}, TypeError, "Fp4Config.scale_rule must be a string"),
        ({"exclude": "lm_head"}, TypeError, "got the string 'lm_head'; wrap it in a list"),
        ({"include": 3}, TypeError, "takes a list of module-name patterns"),
        ({"include": ["a", 1]}, TypeError, r"patterns must be strings, got \[1\]"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        Fp4Config(**kwargs)
