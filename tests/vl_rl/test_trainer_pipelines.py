"""The papers' data pipelines inside RLTrainer: pass-rate pre-filter, mixed-task ratios, RLCS, expansion ratio.

Each is checked on what the trainer drew and logged, and across a resume (the same prompts drawn as by an
uninterrupted run, the filter not run again). The reward is scripted per prompt: ``easy`` prompts always
pass, ``hard`` never, ``mid`` every other call.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from _rl_helpers import samples, tiny
from _threads import one_thread

from vl_rl.config import RLConfig
from vl_rl.rollout import HFRolloutEngine, Rollout
from vl_rl.trainer import RLTrainer
from vl_train.data.format import JsonlDataset


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def prompts(kinds: dict[str, int], tasks: Sequence[str] = ("a",)) -> list[dict[str, Any]]:
    """Synthetic prompts renamed ``<kind>-<i>``, tasks assigned round robin."""
    out = []
    base = samples(sum(kinds.values()))
    names = [f"{kind}-{i}" for kind, n in kinds.items() for i in range(n)]
    for k, (sample, name) in enumerate(zip(base, names, strict=True)):
        out.append({**sample, "id": name, "task": tasks[k % len(tasks)]})
    return out


class ScriptedReward:
    """``easy`` prompts score 1, ``hard`` 0, ``mid`` alternate 1, 0, 1, ... per prompt."""

    __name__ = "scripted"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __call__(self, sample: dict[str, Any], response: str) -> float:
        kind = sample["id"].split("-")[0]
        self.calls[sample["id"]] += 1
        return {"easy": 1.0, "hard": 0.0}.get(kind, float(self.calls[sample["id"]] % 2))


class Recording(HFRolloutEngine):
    """The HF engine, recording the ids of every generate call's prompts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drawn: list[list[str]] = []

    def generate(self, samples: Sequence[dict[str, Any]], group_size: int, *, greedy: bool = False) -> Rollout:
        self.drawn.append([s["id"] for s in samples])
        return super().generate(samples, group_size, greedy=greedy)


def run(tmp_path: Path, data: list[dict[str, Any]], name: str, resume: bool = False, **overrides: Any) -> Any:
    model, processor = tiny()
    base: dict[str, Any] = dict(
        group_size=2,
        prompts_per_step=4,
        mini_batches=1,
        max_new_tokens=2,
        thinking=False,
        max_steps=3,
        eval_every=0,
        save_every=1,
        output_dir=str(tmp_path / name),
        progress=False,
        plot=False,
        trainable=("llm",),
    )
    config = RLConfig(**{**base, **overrides}, optim={"lr": 1e-3})
    engine = Recording(model, processor, max_new_tokens=2, thinking=False)
    trainer = RLTrainer(model, processor, config, data, ScriptedReward(), engine=engine, resume=resume)
    return trainer, trainer.train(), engine


def test_mixed_task_ratios_fix_every_step_and_survive_a_resume(tmp_path: Path) -> None:
    data = prompts({"mid": 12}, tasks=("math", "ocr", "chart"))
    ratios = {"math": 2.0, "ocr": 1.0, "chart": 1.0}
    _, whole, engine = run(tmp_path, data, "whole", task_ratios=ratios, max_steps=4)
    task = {s["id"]: s["task"] for s in data}
    for batch in engine.drawn:
        assert Counter(task[i] for i in batch) == {"math": 2, "ocr": 1, "chart": 1}
    assert whole.steps == 4
    # stop after 2 steps, resume for the other 2: the same prompts as the uninterrupted run
    _, _, first = run(tmp_path, data, "parts", task_ratios=ratios, max_steps=2)
    _, _, second = run(tmp_path, data, "parts", resume=True, task_ratios=ratios, max_steps=4)
    assert first.drawn + second.drawn == engine.drawn
    with pytest.raises(ValueError, match=r"prompts of tasks \{'chart': 4\} \(task: count\) have no weight"):
        run(tmp_path, data, "bad", task_ratios={"math": 1.0, "ocr": 1.0})


def test_rlcs_learns_difficulty_and_draws_the_learnable_prompts(tmp_path: Path) -> None:
    data = prompts({"easy": 8, "hard": 8, "mid": 8})
    trainer, result, engine = run(tmp_path, data, "rlcs", rlcs=True, rlcs_ema=0.5, max_steps=6, prompts_per_step=6)
    curriculum = trainer.pool.sampler.curriculum
    rates = {s["id"]: float(curriculum.pass_rates[i]) for i, s in enumerate(data)}
    seen = {k: v for k, v in rates.items() if v == v}  # not NaN: drawn at least once
    assert all(v == 1.0 for k, v in seen.items() if k.startswith("easy"))
    assert all(v == 0.0 for k, v in seen.items() if k.startswith("hard"))
    assert any(0.0 < v < 1.0 for k, v in seen.items() if k.startswith("mid"))
    record = result.records[-1]
    assert {"rlcs/tier0", "rlcs/tier1", "rlcs/tier2", "rlcs/seen"} <= set(record)
    assert record["rlcs/tier0"] == pytest.approx(0.05) and record["rlcs/tier1"] > 0.5  # too hard / learnable tiers
    # once every prompt has been seen, the learnable (mid) ones dominate the draws
    late = [i for batch in engine.drawn[-2:] for i in batch]
    assert record["rlcs/seen"] == 1.0 and sum(i.startswith("mid") for i in late) > len(late) / 2
    _, _, first = run(tmp_path, data, "rlcs_parts", rlcs=True, rlcs_ema=0.5, max_steps=3, prompts_per_step=6)
    _, _, second = run(tmp_path, data, "rlcs_parts", True, rlcs=True, rlcs_ema=0.5, max_steps=6, prompts_per_step=6)
    assert first.drawn + second.drawn == engine.drawn


def test_prefilter_keeps_the_learnable_prompts_and_is_not_rerun_on_resume(tmp_path: Path) -> None:
    data = prompts({"easy": 3, "hard": 3, "mid": 4}, tasks=("math", "ocr"))
    trainer, result, engine = run(tmp_path, data, "filtered", prefilter_rollouts=4, max_steps=2, rlcs=True)
    kept = sorted(data[i]["id"] for i in result.prefilter.kept)
    assert kept == [f"mid-{i}" for i in range(4)]
    assert result.prefilter.stats == {
        "total": 10.0,
        "kept": 4.0,
        "too_easy": 3.0,
        "all_wrong": 3.0,
        "keep_fraction": 0.4,
    }
    assert engine.drawn[0] == [s["id"] for s in data]  # the filter scored every prompt (one generate call)
    assert all(i.startswith("mid") for batch in engine.drawn[1:] for i in batch)
    # RLCS starts from the filter's offline pass rates
    assert trainer.pool.sampler.curriculum.pass_rates.tolist() != [float("nan")] * 4
    folder = tmp_path / "filtered" / "prefilter"
    report = [json.loads(line) for line in (folder / "pass_rates.jsonl").read_text().splitlines()]
    assert [(r["id"], r["pass_rate"], r["kept"]) for r in report][:4] == [
        ("easy-0", 1.0, False),
        ("easy-1", 1.0, False),
        ("easy-2", 1.0, False),
        ("hard-0", 0.0, False),
    ]
    assert [s["id"] for s in JsonlDataset(folder / "kept.jsonl")] == kept
    assert json.loads((folder / "summary.json").read_text())["settings"]["rollouts"] == 4
    _, resumed, again = run(tmp_path, data, "filtered", True, prefilter_rollouts=4, max_steps=3, rlcs=True)
    assert len(again.drawn) == 1 and all(i.startswith("mid") for i in again.drawn[0])  # no second filtering
    assert resumed.prefilter.kept == result.prefilter.kept
    with pytest.raises(ValueError, match=r"kept none of 6 prompts \(3 solved more than 90% of the time, 3 never"):
        run(tmp_path, prompts({"easy": 3, "hard": 3}), "nothing", prefilter_rollouts=2)


def test_expansion_ratio_oversamples_dynamic_sampling(tmp_path: Path) -> None:
    data = prompts({"easy": 6, "mid": 2})
    _, result, engine = run(tmp_path, data, "dyn", dynamic_sampling=True, expansion_ema=0.5, max_steps=2)
    ratios = [r["expansion_ratio"] for r in result.records]
    assert ratios[0] > 1.0 and all(r["sample_rounds"] >= 1 for r in result.records)
    # the second round of a step asks for ceil(missing * ratio) groups, more than are missing
    assert any(len(batch) > 4 for batch in engine.drawn[1:])
    with pytest.raises(ValueError, match="needs dynamic_sampling"):
        RLConfig(expansion_ema=0.5)


def test_no_signal_warning_names_the_cause(tmp_path: Path) -> None:
    data = prompts({"hard": 4})
    with pytest.warns(RuntimeWarning, match=r"every response scored \[0.0\] on 2 steps and none passed"):
        _, result, _ = run(tmp_path, data, "hard", max_steps=2)
    assert result.no_signal_steps == 2 and "reward never matched" in result.warning
    with pytest.warns(RuntimeWarning, match="group_size is 1"):
        run(tmp_path, data, "single", max_steps=1, group_size=1)
    model, processor = tiny()

    def broken(sample: dict[str, Any], response: str) -> float:
        raise KeyError("answer")

    config = RLConfig(
        group_size=2,
        prompts_per_step=2,
        max_new_tokens=2,
        max_steps=1,
        eval_every=0,
        output_dir=str(tmp_path / "broken"),
        progress=False,
        plot=False,
        thinking=False,
    )
    with pytest.warns(RuntimeWarning, match=r"4 of 4 reward calls failed and scored 0 .*KeyError\('answer'\)"):
        RLTrainer(model, processor, config, data, broken).train()
