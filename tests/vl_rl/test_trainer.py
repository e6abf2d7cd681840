"""RLTrainer: updates, advantage plumbing, degenerate groups, reward failures, NaN, resume, filtering, KL."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _rl_helpers import samples, tiny
from _threads import one_thread

import vl_rl.trainer as trainer_module
from vl_rl.advantages import group_advantages
from vl_rl.config import RLConfig
from vl_rl.rollout import HFRolloutEngine, Rollout, rollout_logprobs
from vl_rl.trainer import RLTrainer


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def length_reward(sample: dict[str, Any], response: str) -> float:
    """A fake reward with spread inside groups: the response's length in characters."""
    return len(response) / 10


def config(tmp_path: Path, **overrides: Any) -> RLConfig:
    base: dict[str, Any] = dict(
        group_size=3,
        prompts_per_step=2,
        mini_batches=2,
        max_new_tokens=4,
        thinking=False,
        max_steps=1,
        eval_every=0,
        output_dir=str(tmp_path / "run"),
        progress=False,
        plot=False,
    )
    merged = {**base, **overrides}
    lr = merged.pop("lr", 1e-2)
    return RLConfig(**merged, optim={"lr": lr})


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class FixedEngine:
    """Returns the same rollout every time (so a test controls responses and rewards exactly)."""

    def __init__(self, rollout: Rollout) -> None:
        self.rollout = rollout

    def generate(self, samples: Any, group_size: int, *, greedy: bool = False) -> Rollout:
        return self.rollout


def test_a_step_changes_the_trainable_weights_only(tmp_path: Path) -> None:
    model, processor = tiny()
    before = weights(model)
    cfg = config(tmp_path, trainable=("llm",), eval_every=1, plot=True, tensorboard=True)
    result = RLTrainer(model, processor, cfg, samples(4), length_reward, eval_samples=samples(2, seed=5)).train()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.language_model") for k in changed)
    assert not any(k.startswith("model.visual") for k in changed)  # vision and merger frozen
    record = result.records[0]
    for key in (
        "reward_mean",
        "pass_rate",
        "entropy",
        "ratio_mean",
        "clip_frac_low",
        "clip_frac_high",
        "response_length",
        "truncation_rate",
        "reward_errors",
        "loss",
        "grad_norm",
        "lr",
    ):
        assert key in record, key
    assert [e["step"] for e in result.eval_history] == [0, 1]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 1
    assert result.plot is not None and result.plot.is_file() and result.checkpoint is not None
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_step_on_video_prompts_trains_through_the_frames(tmp_path: Path) -> None:
    model, processor = tiny()
    before = weights(model)
    cfg = config(tmp_path, trainable=("vision", "merger", "deepstack", "llm"))
    result = RLTrainer(model, processor, cfg, samples(4, tasks=("video_move", "video_appear")), length_reward).train()
    assert result.records[0]["reward_errors"] == 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.visual.patch_embed") for k in changed)  # the video pixels reached the loss


def test_advantages_and_old_logprobs_reach_the_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = tiny()
    torch.manual_seed(0)
    rollout = HFRolloutEngine(model, processor, max_new_tokens=4, thinking=False).generate(samples(2), 3)
    table = {text: float(i) for i, text in enumerate(rollout.texts)}
    with torch.no_grad():
        expected_old, _ = rollout_logprobs(model, rollout.sequences, rollout.model_inputs, rollout.prompt_length)
    seen: list[dict[str, Any]] = []
    picked: list[list[int]] = []
    real_loss, real_select = trainer_module.policy_loss, trainer_module.select_rows

    def spy(logprobs: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, **kw: Any) -> Any:
        seen.append({"old": old, "adv": adv, "mask": mask, **kw})
        return real_loss(logprobs, old, adv, mask, **kw)

    def select_spy(r: Rollout, rows: Any) -> Any:
        picked.append(list(rows))
        return real_select(r, rows)

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    monkeypatch.setattr(trainer_module, "select_rows", select_spy)
    cfg = config(tmp_path, mini_batches=1, method="gspo", advantage_scale="none")
    trainer = RLTrainer(model, processor, cfg, samples(2), lambda s, r: table[r], engine=FixedEngine(rollout))
    record = trainer.train().records[0]
    assert record["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # one update: the policy is still the old one
    (call,) = seen
    rows = picked[-1]  # the update's rows (shuffled)
    assert sorted(rows) == list(range(6)) and rows != list(range(6))
    rewards = torch.tensor([table[t] for t in rollout.texts]).reshape(2, 3)
    want = group_advantages(rewards, "none").reshape(-1)
    torch.testing.assert_close(call["adv"], want[rows])
    m = call["mask"]
    assert torch.equal(m, rollout.completion_mask[rows])
    torch.testing.assert_close(call["old"][m], expected_old[rows][m])
    assert call["method"] == "gspo" and call["kl_coef"] == 0.0


@pytest.mark.parametrize("group_size", [1, 3])
def test_group_of_one_or_equal_rewards_gives_zero_advantage(tmp_path: Path, group_size: int) -> None:
    model, processor = tiny()
    before = weights(model)
    cfg = config(tmp_path, group_size=group_size, mini_batches=1)
    trainer = RLTrainer(model, processor, cfg, samples(2), length_reward if group_size == 1 else lambda s, r: 0.5)
    with pytest.warns(RuntimeWarning, match="1 of 1 RL steps had no learning signal"):
        result = trainer.train()
    assert result.no_signal_steps == 1
    assert torch.equal(trainer.advantages(torch.tensor([[1.0, 1.0, 1.0]])), torch.zeros(1, 3))
    assert torch.equal(trainer.advantages(torch.tensor([[0.3], [0.9]])), torch.zeros(2, 1))
    record = result.records[0]
    assert record["no_signal"] is True and record["skipped"] is False and "loss" not in record
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(v == v for v in record.values() if isinstance(v, float))  # no NaN anywhere


def test_raising_and_hanging_rewards_score_zero_and_are_counted(tmp_path: Path) -> None:
    model, processor = tiny()

    def flaky(sample: dict[str, Any], response: str) -> float:
        if len(response) % 2:
            raise RuntimeError("verifier crashed")
        return 1.0

    def hanging(sample: dict[str, Any], response: str) -> float:
        time.sleep(5)
        return 1.0

    trainer = RLTrainer(model, processor, config(tmp_path), samples(2), flaky)
    record = trainer.train().records[0]
    torch.manual_seed(0)
    rollout = trainer.engine.generate(samples(2), 3)
    rewards = trainer.score(rollout)
    odd = torch.tensor([len(t) % 2 == 1 for t in rollout.texts]).reshape(2, 3)
    assert torch.equal(rewards, (~odd).float())
    assert record["reward_errors"] >= 0 and trainer.reward.errors >= int(odd.sum())

    def swapped_args(prompt: str, response: str, sample: dict[str, Any]) -> float:
        return 1.0

    swapped = RLTrainer(model, processor, config(tmp_path / "swapped"), samples(2), swapped_args)  # type: ignore[arg-type]
    with pytest.warns(RuntimeWarning, match="every reward call failed"):
        assert swapped.train().records[0]["reward_errors"] == 6
    slow = RLTrainer(
        model,
        processor,
        config(tmp_path / "slow", reward_timeout=0.05, group_size=2, prompts_per_step=1),
        samples(1),
        hanging,
    )
    start = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="RewardTimeoutError"):
        record = slow.train().records[0]
    assert time.perf_counter() - start < 4
    assert record["reward_timeouts"] == 2 and record["reward_errors"] == 2 and record["reward_mean"] == 0.0


def test_nan_logprobs_and_bad_input_raise_clear_errors(tmp_path: Path) -> None:
    model, processor = tiny()
    torch.manual_seed(0)
    rollout = HFRolloutEngine(model, processor, max_new_tokens=3, thinking=False).generate(samples(2), 2)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    cfg = config(tmp_path, group_size=2)
    trainer = RLTrainer(model, processor, cfg, samples(2), length_reward, engine=FixedEngine(rollout))
    with pytest.raises(FloatingPointError, match="NaN/inf log-probs"):
        trainer.train()
    with pytest.raises(ValueError, match="at least one training sample"):
        RLTrainer(model, processor, cfg, [], length_reward)
    with pytest.raises(ValueError, match="ref_model"):
        RLTrainer(model, processor, config(tmp_path, kl_coef=0.1), samples(1), length_reward)
    short = copy.copy(rollout)
    short.texts = rollout.texts[:-1]
    with pytest.raises(ValueError, match="3 responses for 4 rows"):
        trainer.score(short)
    with pytest.raises(ValueError, match="no samples to evaluate"):
        trainer.evaluate()


def test_resume_continues_exactly(tmp_path: Path) -> None:
    cfg = dict(max_steps=4, save_every=2, keep_last=0, lr=5e-3)
    model_a, processor = tiny()
    full = RLTrainer(model_a, processor, config(tmp_path / "a", **cfg), samples(6), length_reward).train()

    class Killed(Exception):
        pass

    def kill(trainer: RLTrainer, record: dict[str, Any]) -> None:
        if record["step"] == 3:
            raise Killed

    model_b, _ = tiny()
    with pytest.raises(Killed):
        RLTrainer(
            model_b, processor, config(tmp_path / "b", **cfg), samples(6), length_reward, callbacks=[kill]
        ).train()
    model_c, _ = tiny()  # a fresh process: the start weights, then the checkpoint of step 2
    resumed = RLTrainer(
        model_c, processor, config(tmp_path / "b", **cfg), samples(6), length_reward, resume=True
    ).train()
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(model_c.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert [r["step"] for r in resumed.records] == [1, 2, 3, 4]
    assert [r["reward_mean"] for r in resumed.records] == [r["reward_mean"] for r in full.records]


def test_filtering_dynamic_sampling_and_kl(tmp_path: Path) -> None:
    model, processor = tiny()
    solved = RLTrainer(model, processor, config(tmp_path, filter_solved=0.9), samples(4), lambda s, r: 1.0)
    record = solved.train().records[0]
    assert record["groups_filtered"] == 2 and record["no_signal"] is True
    dyn = RLTrainer(
        model,
        processor,
        config(tmp_path / "dyn", dynamic_sampling=True, max_sample_rounds=3),
        samples(6),
        length_reward,
    )
    record = dyn.train().records[0]
    assert record["groups"] <= 2 and record["sample_rounds"] >= 1 and record["groups_generated"] >= 2
    ref = copy.deepcopy(model)
    kl = RLTrainer(
        model, processor, config(tmp_path / "kl", kl_coef=0.1, mini_batches=1), samples(4), length_reward, ref_model=ref
    )
    record = kl.train().records[0]
    assert record["kl"] == pytest.approx(0.0, abs=1e-6)  # one update: the policy still equals the reference
    assert not any(p.requires_grad for p in ref.parameters())
