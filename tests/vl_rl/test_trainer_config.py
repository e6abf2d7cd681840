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
