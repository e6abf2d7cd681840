"""``vl-train`` distillation recipes (preset Distill + [teacher]) and the distilling trainer's pieces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _trainer_helpers import SyntheticBatches, concat_batches, quiet, tiny_model

from vl_train.builders import build_model
from vl_train.cli import main
from vl_train.config import TrainConfig
from vl_train.distill import off_policy_distill_loss
from vl_train.distill_run import DistillTrainer, teacher_spec
from vl_train.recipe import load_recipe
from vl_train.stages import Distill, DistillSpec
from vl_train.testing import TINY_TEXT, TINY_VISION

QUICK = ["--set", "train.max_steps=2", "--set", "data.size=8", "--set", "train.save_every=0"]
QUICK += ["--set", "train.plot=false", "--set", "teacher.max_new_tokens=4", "--set", "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-sized random teacher saved as a vl-train run folder (``run/model``)."""
    run = tmp_path_factory.mktemp("teacher")
    model, processor = build_model({"tokenizer": "demo", "seed": 5, "text": TINY_TEXT, "vision": TINY_VISION})
    model.save_pretrained(str(run / "model"))
    processor.save_pretrained(str(run / "model"))
    return run


@pytest.mark.parametrize(
    ("mode", "loss"), [("on_policy", "reverse_kl"), ("on_policy", "jsd"), ("off_policy", "ce"), ("off_policy", "jsd")]
)
def test_demo_distill_recipe_runs(
    teacher_dir: Path, tmp_path: Path, mode: str, loss: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["demo_distill", "--output", str(out), "--set", f"teacher.model={teacher_dir}", *QUICK]
    args += ["--set", f"teacher.mode={mode}", "--set", f"teacher.loss={loss}", "--set", "teacher.samples=4"]
    assert main(args) == 0, capsys.readouterr().err
    assert str(out.resolve()) in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(isinstance(r["loss"], float) and not r["skipped"] for r in records)
    assert (out / "model" / "config.json").is_file()
    meta = json.loads((out / "checkpoint-00000002" / "meta.json").read_text())
    assert meta["extra"]["config"]["distill"]["mode"] == mode
    assert meta["extra"]["config"]["distill"]["loss"] == loss
    if mode == "off_policy" and loss == "ce":  # the teacher wrote the training data
        lines = (out / "teacher_data" / "teacher_data.jsonl").read_text().splitlines()
        assert len(lines) == 4 and all("teacher" in json.loads(line) for line in lines)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher.bogus=1", "unknown keys ['bogus'] in [teacher]"),
        ("teacher.loss='ce'", "on_policy distillation supports losses"),
        ("teacher.beta=2.0", "beta must be in [0, 1]"),
        ("teacher.model=''", "[teacher] needs model"),
        ("preset='S1'", "[teacher] is only used with preset = 'Distill'"),
    ],
)
def test_bad_teacher_sections_fail_by_name(override: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo_distill", "--dry-run", "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_distill_without_teacher_or_with_a_missing_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('preset = "Distill"\n[data]\nsize = 4\n')
    assert main([str(recipe), "--dry-run"]) == 2
    assert "needs a [teacher] section" in capsys.readouterr().err
    missing = ["--set", f"teacher.model={tmp_path / 'nowhere'}", "--output", str(tmp_path / "o"), *QUICK]
    assert main(["demo_distill", *missing]) == 2
    assert "no model in" in capsys.readouterr().err


def test_packaged_distill_recipe_is_on_policy() -> None:
    recipe = load_recipe("demo_distill")
    spec = teacher_spec(recipe["teacher"], DistillSpec())
    assert (spec.mode, spec.loss, spec.max_new_tokens) == ("on_policy", "reverse_kl", 24)
    # switching the mode alone picks that mode's default loss
    assert teacher_spec({"model": "x", "mode": "on_policy"}, DistillSpec()).loss == "reverse_kl"
    assert teacher_spec({"model": "x", "mode": "off_policy"}, DistillSpec(mode="on_policy", loss="jsd")).loss == "ce"


def test_off_policy_kl_over_micro_batches_equals_one_big_batch(tmp_path: Path) -> None:
    # DistillTrainer (teacher logits at labelled targets, global normaliser) vs the full-logits layout on one batch
    source = SyntheticBatches(seed=4, rows=2, length=16)
    micro = [source.batch(0), source.batch(1)]
    teacher = tiny_model(seed=9)
    config = Distill("off_policy", "forward_kl", **quiet(grad_accum_steps=2, output_dir=str(tmp_path)))
    student = tiny_model()
    trainer = DistillTrainer(student, teacher, config, iter(micro))
    total, _ = trainer.accumulate(micro)
    want_student = tiny_model()
    big = concat_batches(micro)
    with torch.no_grad():
        full = teacher(**{k: v for k, v in big.items() if k != "labels"}).logits
    want = off_policy_distill_loss(want_student, big, full, loss="forward_kl", reduction="sqrt")
    want.loss.backward()
    assert float(total) == pytest.approx(float(want.loss.detach()), rel=1e-5)
    got_grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert got_grads and all(".visual." not in n for n in got_grads)  # Distill trains the LLM only
    want_grads = dict(want_student.named_parameters())
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name].grad, rtol=1e-4, atol=1e-7, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_trainer_rejects_bad_setups(tmp_path: Path) -> None:
    cfg = TrainConfig(**quiet(output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="no distillation spec"):
        DistillTrainer(tiny_model(), tiny_model(seed=1), cfg, [])
    with pytest.raises(ValueError, match="use Trainer"):
        DistillTrainer(tiny_model(), tiny_model(seed=1), Distill(**quiet(output_dir=str(tmp_path))), [])


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_on_policy_step_matches_the_distill_function(tmp_path: Path, loss: str) -> None:
    # one micro-batch, token reduction: the trainer's loss and gradients are on_policy_distill_step's (same samples)
    from _cli_helpers import prompt_batch, tiny_vlm

    from vl_train.distill import on_policy_distill_step

    teacher, batch = tiny_vlm(seed=3), prompt_batch()
    config = Distill("on_policy", loss, max_new_tokens=4, **quiet(loss_reduction="token", output_dir=str(tmp_path)))
    student = tiny_vlm()
    trainer = DistillTrainer(student, teacher, config, [batch])
    torch.manual_seed(123)
    total, _ = trainer.accumulate([batch])
    want_student = tiny_vlm()
    want_student.requires_grad_(False)
    want_student.model.language_model.requires_grad_(True)
    want_student.lm_head.requires_grad_(True)
    torch.manual_seed(123)
    want = on_policy_distill_step(want_student, teacher, batch, loss=loss, max_new_tokens=4, reduction="token")
    want.loss.backward()
    assert float(total) == pytest.approx(float(want.loss.detach()), rel=1e-5)
    grads = dict(want_student.named_parameters())
    got = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert got and set(got) == {n for n, p in grads.items() if p.grad is not None}
    for name, grad in got.items():
        torch.testing.assert_close(grad, grads[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_distill_trainer_refuses_context_parallelism(tmp_path: Path) -> None:
    from _trainer_helpers import tiny_model

    cfg = Distill("off_policy", "forward_kl", context_parallel=2, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="distillation does not support context_parallel > 1"):
        DistillTrainer(tiny_model(), tiny_model(1), cfg, iter([]))
