"""The ``vl-rl`` command line: recipes, overrides, unknown keys, a tiny end-to-end run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from _rl_helpers import TINY_MODEL
from _threads import one_thread

from vl_rl.cli import build_reward, load_recipe, main, packaged_recipes, resolve_config
from vl_rl.config import RLConfig
from vl_rl.rewards import repetition_penalty
from vl_train.data.synthetic import SyntheticDataset


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def _tiny_overrides() -> list[str]:
    text, vision = TINY_MODEL["text"], TINY_MODEL["vision"]
    sets = ['model.init_from=""', 'model.tokenizer="demo"', "model.max_pixels=4096", "model.min_pixels=1024"]
    sets += [f"model.text.{k}={json.dumps(v)}" for k, v in text.items() if k != "rope_parameters"]
    sets += [f"model.vision.{k}={json.dumps(v)}" for k, v in vision.items()]
    rope = '{ rope_type = "default", rope_theta = 10000.0, mrope_section = [4, 2, 2] }'
    sets += [f"model.text.rope_parameters={rope}"]
    sets += ["data.size=8", "data.heldout_size=2", "data.image_size_range=[48, 64]"]
    sets += ["rl.group_size=2", "rl.prompts_per_step=2", "rl.max_new_tokens=3", "rl.max_steps=2", "rl.eval_every=1"]
    sets += ["rl.eval_samples_per_prompt=1"]
    return [x for s in sets for x in ("--set", s)]


def test_packaged_recipes_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(packaged_recipes()) == {"demo_sapo", "demo_gspo", "qwen3_vl_rl", "glm45v_rl"}
    for name in ("demo_sapo", "demo_gspo"):
        config = resolve_config(load_recipe(name))
        assert config.method == name.split("_")[1] and isinstance(config, RLConfig)
    for name in packaged_recipes():
        assert main([name, "--dry-run"]) == 0, name
    qwen, glm = resolve_config(load_recipe("qwen3_vl_rl")), resolve_config(load_recipe("glm45v_rl"))
    # Qwen3-VL: SAPO, 16 rollouts, the pass-rate filter at 90 %, fixed task ratios (REFERENCE.md section 5)
    assert (qwen.method, qwen.group_size, qwen.prefilter_rollouts, qwen.prefilter_high) == ("sapo", 16, 16, 0.9)
    assert qwen.prefilter_drop_all_wrong and qwen.task_ratios and not qwen.rlcs
    # GLM-4.5V: GRPO without KL, clip-higher, RLCS from offline pass rates, dynamic sampling with the EMA ratio
    assert (glm.method, glm.kl_coef, glm.clip_low, glm.clip_high) == ("grpo", 0.0, 0.2, 0.28)
    assert glm.rlcs and glm.prefilter_rollouts > 0 and glm.prefilter_high == 1.0 and not glm.prefilter_drop_all_wrong
    assert glm.dynamic_sampling and glm.expansion_ema is not None and glm.force_answer and glm.thinking
    printed = capsys.readouterr().out
    assert "code_switching" in printed and "repetition" in printed and "verifier 'grounding'" in printed


def test_unknown_keys_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load_recipe("demo_sapo")
    for section, key in (("rl", "learning_rate"), ("data", "sise"), ("reward", "weight"), ("model", "layers")):
        bad = {**recipe, section: {**recipe[section], key: 1}}
        with pytest.raises(ValueError, match=key):
            resolve_config(bad)
    with pytest.raises(ValueError, match="'extra'"):
        resolve_config({**recipe, "extra": {}})
    with pytest.raises(ValueError, match=r"unknown keys \['kind'\] in \[reward\]"):
        resolve_config({**recipe, "reward": {"kind": "synthetic"}})
    with pytest.raises(ValueError, match=r"keys \['path'\] do not apply to kind = 'synthetic'"):
        resolve_config({**recipe, "data": {**recipe["data"], "path": "x.jsonl"}})
    assert main(["demo_sapo", "--set", "rl.nope=1", "--dry-run"]) == 2
    assert "unknown RLConfig keys ['nope']" in capsys.readouterr().err
    assert main(["no_such_recipe"]) == 2
    assert "packaged: ['demo_gspo', 'demo_sapo', 'glm45v_rl', 'qwen3_vl_rl']" in capsys.readouterr().err


def test_reward_adds_weighted_penalties() -> None:
    sample = SyntheticDataset("train", size=1, tasks=["count"], image_size_range=(48, 64), thinking=0)[0]
    right = str(sample["answer"])
    synthetic = {"verifier": "synthetic"}
    assert build_reward(synthetic)(sample, right) == 1.0
    assert build_reward({**synthetic, "format_weight": 0.5})(sample, f"<think>\nfew\n</think>\n\n{right}") == 1.5
    loop = " ".join(["red circle blue square"] * 10) + f" {right}"
    penalty = repetition_penalty(loop)
    assert penalty < -0.5 and build_reward(synthetic)(sample, loop) == 1.0
    assert build_reward({**synthetic, "repetition_weight": 0.5})(sample, loop) == pytest.approx(1.0 + 0.5 * penalty)


def test_tiny_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rl"
    assert main(["demo_sapo", "--output", str(out), *_tiny_overrides()]) == 0
    printed = capsys.readouterr().out
    assert f"outputs in {out.resolve()}" in printed and "held-out reward" in printed
    assert (out / "model" / "config.json").is_file() and (out / "reward_curve.png").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "eval_reward" in records[-1]
    # the next stage starts from this output
    assert (
        main(
            [
                "demo_gspo",
                "--init-from",
                str(out),
                "--output",
                str(tmp_path / "next"),
                *_tiny_overrides()[:0],
                "--set",
                "rl.max_steps=1",
                "--set",
                "data.size=4",
                "--set",
                "data.heldout_size=0",
                "--set",
                "rl.group_size=2",
                "--set",
                "rl.prompts_per_step=1",
                "--set",
                "rl.max_new_tokens=2",
            ]
        )
        == 0
    )


def test_data_grid_reaches_the_prompts() -> None:
    from vl_rl.prompt_data import _synthetic

    train, held = _synthetic(
        {"tasks": ["count"], "size": 4, "heldout_size": 3, "grid": 32, "image_size_range": [64, 100]}
    )
    images = [item["image"] for s in train + held for item in s["messages"][0]["content"] if item["type"] == "image"]
    assert len(images) == 7 and all(im.size[0] % 32 == 0 and im.size[1] % 32 == 0 for im in images)


def test_judges_are_bounded_by_the_reward_timeout() -> None:
    from vl_rl.cli import recipe_reward

    recipe = {"data": {"kind": "jsonl", "path": "x.jsonl"}, "reward": {"judge": {"url": "http://127.0.0.1:9/v1"}}}
    reward = recipe_reward(recipe, RLConfig(reward_timeout=7.0))
    assert reward.reward.timeout_s == 7.0  # type: ignore[attr-defined]  # the judge's default: the run's limit
    assert "timeout_s" not in recipe["reward"]["judge"]  # the recipe itself is left as given
    slow = {**recipe, "reward": {"tasks": {"free": {"judge": {"url": "http://127.0.0.1:9/v1", "timeout_s": 30.0}}}}}
    with pytest.raises(
        ValueError, match=r"\[reward.tasks.free.judge\] timeout_s = 30 exceeds \[rl\] reward_timeout = 7"
    ):
        recipe_reward(slow, RLConfig(reward_timeout=7.0))
