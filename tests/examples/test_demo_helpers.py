"""Unit tests of the demo's helpers: batched evaluation, the accuracy table, plots, the report, RL records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from demo_eval import CHANCE, chance_level, evaluate_samples, generate_answers, majority_baseline
from demo_pipeline import DemoSettings, StageSpec, build_demo_model, default_stages, run_stage
from demo_report import QA, accuracy_table, plot_rewards, plot_stage_losses, write_report
from demo_rl import RLRun, RLSpec, SeedRun, record_rewards, rl_available, run_rl, standard_error_over_prompts

from vl_train.data.messages import prompt_inputs
from vl_train.data.synthetic import TASK_NAMES, SyntheticDataset, verify


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    settings = DemoSettings(
        text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
        vision={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "patch_size": 8},
    )
    torch.manual_seed(0)
    return build_demo_model(settings)


def _samples(n: int = 5) -> list[dict[str, Any]]:
    tasks = ["count", "colour", "text_math", "video_move"]
    return list(
        SyntheticDataset("heldout", size=n, seed=1, tasks=tasks, image_size_range=(48, 64), video_frames=(2, 3))
    )


def test_chance_levels_cover_every_task_and_reject_unknown_ones() -> None:
    assert set(CHANCE) == set(TASK_NAMES)
    assert chance_level("colour") == pytest.approx(1 / 6)
    assert chance_level("count") <= 0.2
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        chance_level("nope")


def test_batched_answers_equal_one_at_a_time_generation(tiny: tuple[Any, Any]) -> None:
    """Reference: each prompt alone (``prompt_inputs`` + ``generate``), no padding."""
    model, processor = tiny
    samples = _samples(4)
    batched = generate_answers(model, processor, samples, max_new_tokens=5, thinking=True)
    tok = processor.tokenizer
    stop = {tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    for sample, answer in zip(samples, batched):
        inputs = prompt_inputs(processor, sample, thinking=True)
        out = model.generate(
            **inputs,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        )
        ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        ids = ids[: next((k for k, t in enumerate(ids) if t in stop), len(ids))]
        assert answer == tok.decode(ids, skip_special_tokens=False)


def test_evaluate_scores_with_the_verifier_per_task(tiny: tuple[Any, Any]) -> None:
    model, processor = tiny
    samples = _samples(8)
    result = evaluate_samples(model, processor, samples, batch_size=3, max_new_tokens=4, progress=False)
    assert result.scores == [verify(s, r) for s, r in zip(samples, result.responses)]
    assert result.count == {"colour": 2, "count": 2, "text_math": 2, "video_move": 2}
    for task in result.count:
        expected = [sc for s, sc in zip(samples, result.scores) if s["task"] == task]
        assert result.per_task[task] == pytest.approx(sum(expected) / len(expected))
    # a reward that knows the answers scores everything 1
    perfect = evaluate_samples(
        model, processor, samples, batch_size=8, max_new_tokens=1, progress=False, reward_fn=lambda s, r: 1.0
    )
    assert perfect.mean == 1.0 and set(perfect.per_task.values()) == {1.0}


def test_evaluate_rejects_bad_arguments(tiny: tuple[Any, Any]) -> None:
    model, processor = tiny
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_samples(model, processor, _samples(1), batch_size=0)
    with pytest.raises(ValueError, match="at least one sample"):
        evaluate_samples(model, processor, [])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_answers(model, processor, _samples(1), max_new_tokens=0, thinking=False)


def test_default_stages_scale_and_unknown_mixture_task(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    full, small = default_stages(), default_stages(scale=0.0)
    assert [s.name for s in full] == ["S0", "S1", "SFT"]
    assert all(s.steps == 2 for s in small) and all(f.steps > 2 for f in full)
    model, processor = tiny
    settings = DemoSettings(mixture={"count": 1.0, "juggling": 1.0})
    with pytest.raises(ValueError, match="unknown tasks \\['juggling'\\]"):
        run_stage(model, processor, settings, StageSpec("S0", 2, 1e-3), tmp_path / "s0", progress=False)


def test_accuracy_table_rows_columns_mean_and_chance() -> None:
    rows = [("before", {"count": 0.1, "colour": 0.2}), ("after S1", {"count": 0.85, "colour": 1.0})]
    table = accuracy_table(rows, {"count": 1 / 9, "colour": 1 / 6}, tasks=["count", "colour"])
    assert table.splitlines() == [
        "| stage | count | colour | mean |",
        "|---|---:|---:|---:|",
        "| before | 10.0 | 20.0 | 15.0 |",
        "| after S1 | 85.0 | 100.0 | 92.5 |",
        "| chance | 11.1 | 16.7 | 13.9 |",
    ]
    assert "| x | - | 50.0 | 50.0 |" in accuracy_table([("x", {"colour": 0.5})], {}, tasks=["count", "colour"])
    with pytest.raises(ValueError, match="at least one row"):
        accuracy_table([], {})


def test_plots_write_pngs_and_reject_empty_input(tmp_path: Path) -> None:
    losses = plot_stage_losses({"S0": [3.0, 2.0], "S1": [2.0, float("nan"), 1.0]}, tmp_path / "loss.png")
    rewards = plot_rewards([0.1, 0.3, 0.2, 0.6], tmp_path / "reward.png", evals=[(0, 0.2), (4, 0.5)])
    for path in (losses, rewards):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one finite loss"):
        plot_stage_losses({"S0": [float("nan")]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one reward"):
        plot_rewards([], tmp_path / "y.png")


def test_report_holds_table_times_answers_and_links(tmp_path: Path) -> None:
    qa = [
        QA("image", "How many stars?", "3", "3", 1.0, "examples/a.png"),
        QA("video", "When?", "x", "y", 0.0),
        QA("video", "When does it move?", "star at 0.5 seconds", "star at 1.0 seconds", 1.0),
    ]
    path = write_report(
        tmp_path / "report.md",
        title="demo",
        table="| t |",
        times={"S0": 1.5, "S1": 2.0},
        qa=qa,
        figures={"Loss": "loss.png"},
        notes=["a note"],
    )
    text = path.read_text()
    assert "| t |" in text and "| S0 | 1.5 |" in text and "| total | 3.5 |" in text
    assert "![image](examples/a.png) **Q (image):** How many stars?" in text and "(expected `3`: right)" in text
    assert "(expected `y`: wrong)" in text and "- [Loss](loss.png)" in text and "- a note" in text
    assert "(expected `star at 1.0 seconds`: right within the verifier's tolerance)" in text


def test_record_rewards_reads_known_keys_and_names_missing_ones() -> None:
    assert record_rewards([{"reward_mean": 0.5}, {"reward/mean": 1}, {"loss": 2.0}]) == [0.5, 1.0]
    assert record_rewards([]) == []
    with pytest.raises(ValueError, match=r"no reward in the RL records.*'loss'"):
        record_rewards([{"loss": 1.0}])


def test_majority_baseline_scores_the_most_frequent_answer() -> None:
    def sample(task: str, answer: str) -> dict[str, object]:
        return {"task": task, "messages": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]}

    samples = [sample("count", "1"), sample("count", "1"), sample("count", "3"), sample("colour", "red")]
    exact = majority_baseline(samples, reward_fn=lambda s, r: float(_reference(s) == r))
    assert exact == {"count": pytest.approx(2 / 3), "colour": 1.0}


def _reference(sample: dict[str, object]) -> str:
    messages = sample["messages"]
    assert isinstance(messages, list)
    return str(messages[-1]["content"][0]["text"])


def test_majority_baseline_on_synthetic_counting_is_far_above_uniform_chance() -> None:
    from vl_train.data.synthetic import SyntheticDataset

    held = list(SyntheticDataset("heldout", size=60, seed=0, tasks=["count"], image_size_range=(48, 64)))
    assert majority_baseline(held)["count"] > 2 * CHANCE["count"]


def _rl_run(afters: list[float], before: float = 0.25) -> RLRun:
    runs = [SeedRun(seed, after, 0.5, 1.0) for seed, after in enumerate(afters)]
    return RLRun(3.0, [0.1], [(0, 0.5), (1, 0.5)], 0.5, 0.5, before, 0.02, runs, Path("rl"))


def test_rl_gain_against_seed_noise() -> None:
    run = _rl_run([0.45, 0.35, 0.40])
    assert run.gains == pytest.approx([0.20, 0.10, 0.15])
    assert run.gain_mean == pytest.approx(0.15)
    assert run.gain_std == pytest.approx(0.05)  # sample standard deviation (n - 1)
    line = run.summary("sapo", ["count"], 50, 4)
    assert "gain +0.150 +- 0.050 over 3 seeds (more than twice the seed noise)" in line
    assert "standard error of one such estimate over prompts 0.020" in line
    noisy = _rl_run([0.45, 0.05, 0.30])
    assert "NOT above twice the seed noise" in noisy.summary("sapo", ["count"], 50, 4)
    single = _rl_run([0.30])
    assert single.gain_std == 0.0 and "seed noise" not in single.summary("sapo", ["count"], 50, 4)


def test_probe_runs_two_phases_and_splits_colour_by_colours_present(tmp_path: Path) -> None:
    import json

    import probe

    log = tmp_path / "results.jsonl"
    argv = ["tiny", "--mixture", '{"colour": 1}', "--s0-steps", "2", "--steps", "2"]
    argv += ["--then-mixture", '{"colour": 1, "count": 1}', "--then-steps", "2", "--eval-size", "3", "--log", str(log)]
    probe.main(argv)
    row = json.loads(log.read_text().splitlines()[-1])
    assert row["name"] == "tiny" and row["argv"] == argv
    assert 0.0 <= row["count"] <= 1.0 and 0.0 <= row["colour"] <= 1.0
    split = row["colour_by_colours_present"]
    assert sum(n for n, _ in split.values()) == 3 and all(1 <= int(k) <= 6 for k in split)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "tiny"]


def test_probe_counts_the_colours_in_an_image() -> None:
    import PIL.Image
    import probe

    from vl_train.data._shapes import COLOURS

    image = PIL.Image.new("RGB", (8, 8), (128, 128, 128))
    image.putpixel((1, 1), COLOURS["red"])
    image.putpixel((5, 5), COLOURS["blue"])
    image.putpixel((6, 6), (221, 40, 40))  # one level off red: not a dataset colour
    assert probe.colours_present({"messages": [{"content": [{"type": "image", "image": image}]}]}) == 2


@pytest.mark.parametrize("task", ["kind", "colour"])
def test_tower_probe_scenes_and_a_short_run(task: str) -> None:
    import numpy as np
    import tower_probe

    from vl_train.data._shapes import COLOURS, KINDS

    rng = np.random.default_rng(0)
    for _ in range(20):
        image, kind, target = tower_probe.draw(rng, task, 32, (96, 128))
        assert image.size[0] % 32 == 0 and image.size[1] % 32 == 0
        pixels = np.asarray(image).reshape(-1, 3)
        if task == "kind":
            assert target == kind and 0 <= kind < len(KINDS)
        else:  # the asked shape's colour is in the image
            assert (pixels == np.array(list(COLOURS.values())[target])).all(1).any()
    rows = tower_probe.run(tower_probe.parse_args([task, "--steps", "2", "--eval-every", "1", "--grid", "0"]))
    assert [r["step"] for r in rows] == [1, 2] and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


def test_tower_probe_rejects_a_grid_too_small_for_a_shape(capsys: pytest.CaptureFixture[str]) -> None:
    import tower_probe

    with pytest.raises(SystemExit):
        tower_probe.parse_args(["kind", "--grid", "8"])
    assert "--grid must be 0 (shapes anywhere) or between 16 and 96, got 8" in capsys.readouterr().err


def test_standard_error_counts_each_prompt_once() -> None:
    import statistics

    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.0]  # 3 prompts x 3 responses
    means = [2 / 3, 1 / 3, 0.5]
    want = statistics.stdev(means) / len(means) ** 0.5
    assert standard_error_over_prompts(rewards, 3) == pytest.approx(want)
    assert standard_error_over_prompts([0.2, 0.4], 2) == 0.0  # one prompt: no spread to measure
    for bad, k in (([1.0, 0.0, 1.0], 2), ([1.0], 0), ([], 1)):
        with pytest.raises(ValueError, match="groups of"):
            standard_error_over_prompts(bad, k)


def test_run_rl_needs_a_seed(tmp_path: Path) -> None:
    if not rl_available():
        pytest.skip("vl_rl.trainer is not importable")
    with pytest.raises(ValueError, match="at least one seed"):
        run_rl(None, None, RLSpec(seeds=()), tmp_path)


def test_v0_cell_labels_follow_the_merged_token_order() -> None:
    """Cell ``r * columns + c`` is the merged token whose 2x2 patch window covers that cell's pixels."""
    from demo_vision import EMPTY_COLOUR, EMPTY_KIND, cell_labels

    from vl_train.data._shapes import COLOURS, KINDS, Scene, Shape

    scene = Scene(width=96, height=64, grey=128, noise=0, noise_seed=0, shapes=[], grid=32)
    scene.shapes.append(Shape("star", "red", x=32 + 3, y=32 + 4, size=24))  # row 1, column 1
    scene.shapes.append(Shape("circle", "blue", x=64 + 1, y=2, size=26))  # row 0, column 2
    kinds, colours = cell_labels(scene, 32)
    assert kinds.tolist() == [
        EMPTY_KIND,
        EMPTY_KIND,
        KINDS.index("circle"),
        EMPTY_KIND,
        KINDS.index("star"),
        EMPTY_KIND,
    ]
    assert colours[4] == list(COLOURS).index("red") and colours[2] == list(COLOURS).index("blue")
    assert colours[0] == EMPTY_COLOUR

    settings = DemoSettings(vision={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "patch_size": 16})
    _, processor = build_demo_model(settings)
    inputs = processor.image_processor([scene.render()])
    patches = inputs["pixel_values"].reshape(-1, 4, inputs["pixel_values"].shape[-1])  # merge windows in order
    assert patches.shape[0] == kinds.numel()
    busy = [i for i in range(patches.shape[0]) if float(patches[i].std()) > 1e-3]
    assert busy == [2, 4], "the shapes' pixels must land in the merged tokens their labels name"

    with pytest.raises(ValueError, match="straddles"):
        scene.shapes.append(Shape("square", "green", x=20, y=2, size=20))
        cell_labels(scene, 32)
    with pytest.raises(ValueError, match="multiples of the grid"):
        cell_labels(Scene(width=90, height=64, grey=128, noise=0, noise_seed=0, shapes=[], grid=0), 32)


def test_v0_trains_the_tower_alone(tmp_path: Path) -> None:
    import json

    from demo_vision import TowerSpec, pretrain_tower

    settings = DemoSettings(
        text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
        vision={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "patch_size": 16},
    )
    model, processor = build_demo_model(settings)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds, losses = pretrain_tower(
        model, processor, settings, TowerSpec(steps=3, scenes_per_step=2), tmp_path / "V0", progress=False
    )
    assert seconds > 0 and len(losses) == 3 and all(np.isfinite(v) for v in losses)
    records = [json.loads(line) for line in (tmp_path / "V0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("model.visual.merger") for k in changed), "the merger must train"
    assert not any("language_model" in k or k.startswith("lm_head") for k in changed), "the LLM must not move"
    assert all(p.grad is None for p in model.parameters())

    settings.grid = 0
    with pytest.raises(ValueError, match="grid > 0"):
        pretrain_tower(model, processor, settings, TowerSpec(steps=1), tmp_path / "V0b", progress=False)


def test_rl_recipe_is_what_vl_rl_reads(tmp_path: Path) -> None:
    """The demo's RL runs are vl-rl recipes: the TOML it writes is the dict it runs, and the CLI accepts it."""
    if not rl_available():
        pytest.skip("vl_rl.trainer is not importable")
    import tomllib

    from demo_rl import _toml, rl_recipe

    from vl_rl.cli import main, resolve_config

    spec = RLSpec(steps=3, extra={"filter_solved": 0.9})
    recipe = rl_recipe(spec, tmp_path / "start", tmp_path / "train.jsonl", tmp_path / "seed0", 7, progress=False)
    path = tmp_path / "recipe.toml"
    path.write_text(_toml(recipe))
    assert tomllib.loads(path.read_text()) == recipe
    config = resolve_config(recipe)
    assert (config.seed, config.max_steps, config.filter_solved, config.trainable) == (7, 3, 0.9, ("llm",))
    assert (config.optim.lr, config.optim.min_lr_ratio) == (spec.lr, 0.1)  # the measured runs' schedule
    assert main([str(path), "--dry-run"]) == 0
