"""Config checks before anything is built: numbers, unknown groups and keys, Hydra's errors in
one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mpcl.errors import ConfigError
from mpcl.run.config import (
    NUMBERS,
    check_overrides,
    config_keys,
    hydra_error_line,
    override_key,
    validate,
)

CONF = Path(__file__).parents[1] / "conf"


def _cfg(**values):
    cfg = OmegaConf.create({"trainer": {"max_steps": 10}})
    for key, value in values.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    return cfg


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("trainer__max_steps", 0, "must be a positive integer"),
        ("trainer__max_steps", 2.5, "must be a positive integer"),
        ("trainer__max_steps", None, "must be a positive integer"),
        ("data__batch_size", "two", "must be a positive integer"),
        ("data__num_workers", -1, r"must be >= 0 \(an integer\)"),
        ("uda__optimizer__lr", float("nan"), "must be > 0"),
        ("seed", 1.5, "must be an integer"),
    ],
)
def test_bad_numbers_are_one_line_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(_cfg(**{key: value}))
    assert str(info.value).startswith(key.replace("__", "."))


def test_good_numbers_pass_and_absent_keys_are_skipped():
    validate(_cfg(data__batch_size=2, uda__optimizer__lr=6e-5, seed=0))
    assert {k for k, *_ in NUMBERS} >= {"trainer.max_steps", "uda.optimizer.lr"}
    # Prototype values are checked once, by their constructor (mpcl.prototypes).
    assert not any(k.startswith("prototype.") for k, *_ in NUMBERS)


def test_unknown_group_choice_names_the_choices():
    with pytest.raises(ConfigError, match="unknown prototype 'gausian': choose one of centroid"):
        check_overrides(["prototype=gausian"], CONF)
    check_overrides(["prototype=gaussian", "prototype.K=3", "--help"], CONF)


def test_override_keys_and_config_keys():
    assert override_key("+a.b=1") == override_key("~a.b") == override_key("++a.b=2") == "a.b"
    keys = config_keys(OmegaConf.create({"a": {"b": 1}, "c": 2, "hydra": {"x": 1}}))
    assert keys == ["a", "a.b", "c"]


def test_hydra_errors_become_one_line_with_close_keys():
    error = Exception(
        "Could not override 'prototype.k'.\nTo append to your config use +prototype.k=3"
    )
    line = hydra_error_line(error, ["prototype.K", "trainer.max_steps"])
    assert (
        line
        == "unknown config key 'prototype.k': did you mean prototype.K? (a new key needs a +: +prototype.k=...)"
    )
    error = Exception("Some problem\nwith details\n\nSee https://hydra.cc for more")
    assert hydra_error_line(error) == "Some problem with details"
