"""RLConfig: defaults, dict round trip, unknown keys and bad values named in the error."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vl_train", reason="RLConfig builds on vl-train's RunConfig (vl-rl[train])")

from vl_rl.config import RLConfig


def test_defaults_and_round_trip() -> None:
    config = RLConfig()
    assert (config.method, config.group_size, config.tau_pos, config.tau_neg) == ("sapo", 8, 1.0, 1.05)
    assert config.filter_solved is None and config.dynamic_sampling is False
    again = RLConfig.from_dict(config.to_dict())
    assert again == config and isinstance(again.trainable, tuple)
    changed = config.replace(optim={"lr": 3e-4}, trainable=["llm"])
    assert changed.trainable == ("llm",) and changed.optim.lr == 3e-4 and changed.optim.min_lr_ratio == 1.0
    assert config.optim.min_lr_ratio == 1.0 and config.trainable == ("merger", "deepstack", "llm")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"method": "ppo"}, "method 'ppo'"),
        ({"group_size": 0}, "group_size must be >= 1"),
        ({"eval_every": -1}, "eval_every must be >= 0"),
        ({"temperature": 0.0}, "temperature > 0"),
        ({"mini_batches": 100, "group_size": 2, "prompts_per_step": 2}, "mini_batches"),
        ({"filter_solved": 1.5}, "filter_solved"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"advantage_scale": "rank"}, "advantage_scale"),
        ({"trainable": ("vision", "head")}, "unknown parts \\['head'\\]"),
    ],
)
def test_bad_values_are_named(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RLConfig(**overrides)


def test_unknown_keys_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown RLConfig keys \['learning_rate'\]"):
        RLConfig.from_dict({"learning_rate": 1e-5})
    with pytest.raises(ValueError, match="known keys are"):
        RLConfig().replace(grup_size=4)


def test_an_optim_mapping_updates_the_rl_defaults() -> None:
    # a partial optimiser table keeps the RL default of a constant rate, as a recipe's [optim] section does
    config = RLConfig(optim={"lr": 3e-4})
    assert config.optim.lr == 3e-4 and config.optim.min_lr_ratio == 1.0
    assert RLConfig(optim={"lr": 3e-4, "min_lr_ratio": 0.1}).optim.min_lr_ratio == 0.1
    assert RLConfig.from_dict(config.to_dict()) == config


def test_pipeline_keys_are_checked() -> None:
    assert RLConfig(task_ratios={"math": 2, "ocr": 1}).task_ratios == {"math": 2.0, "ocr": 1.0}
    problems = {
        "set one of them": {"task_ratios": {"a": 1.0}, "rlcs": True},
        "needs dynamic_sampling": {"expansion_ema": 0.9},
        "rise strictly": {"rlcs_tiers": (0.0, 0.7, 0.3, 1.0)},
        "prefilter_rollouts = 1": {"prefilter_rollouts": 1},
        "weights >= 0": {"task_ratios": {"a": -1.0}},
        "prefilter_high": {"prefilter_high": 1.5},
    }
    for match, overrides in problems.items():
        with pytest.raises(ValueError, match=match):
            RLConfig(**overrides)
