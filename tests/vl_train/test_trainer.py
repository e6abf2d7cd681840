"""Tests of the training loop: learning, accumulation, freezing, per-part rates, NaN handling, outputs."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from _trainer_helpers import (
    SyntheticBatches,
    concat_batches,
    make_batch,
    nan_hook,
    quiet,
    snapshot,
    tiny_model,
)

from vl_model.parts import part_parameters
from vl_train.config import TrainConfig
from vl_train.losses import lm_loss
from vl_train.metrics import MetricsLogger
from vl_train.trainer import OutputDirError, Trainer, shift_labels


def test_loss_falls_on_a_tiny_overfit_run(tmp_path: Path) -> None:
    cfg = TrainConfig(**quiet(max_steps=20, lr=3e-3, output_dir=str(tmp_path)))
    result = Trainer(tiny_model(), cfg, SyntheticBatches(distinct=1)).train()
    assert result.steps == 20 and result.stopped_reason == "max_steps"
    assert len(result.losses) == 20
    assert result.losses[-1] < 0.8 * result.losses[0]


def test_step_loss_is_the_shifted_lm_loss(tmp_path: Path) -> None:
    """The first logged loss equals an independent next-token cross-entropy with the sqrt reduction."""
    model = tiny_model()
    data = SyntheticBatches(rows=3, length=12)
    batch = data.batch(0)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    logp = torch.log_softmax(logits, -1)
    num = den = 0.0
    for r in range(3):
        targets = batch["labels"][r, 1:]
        keep = targets != -100
        nll = -logp[r, :-1][keep].gather(-1, targets[keep, None]).squeeze(-1)
        num += float(nll.sum()) / float(keep.sum()) ** 0.5
        den += float(keep.sum()) ** 0.5
    cfg = TrainConfig(**quiet(max_steps=1, output_dir=str(tmp_path), loss_reduction="sqrt"))
    result = Trainer(model, cfg, data).train()
    assert result.losses[0] == pytest.approx(num / den, rel=1e-5)


def test_shift_labels() -> None:
    labels = torch.tensor([[-100, 5, 6, 7], [1, 2, -100, 3]])
    assert shift_labels(labels).tolist() == [[5, 6, 7, -100], [2, -100, 3, -100]]
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        shift_labels(labels[0])


@pytest.mark.parametrize("reduction", ["sqrt", "token", "sample"])
def test_grad_accumulation_2x2_equals_1x4(tmp_path: Path, reduction: str) -> None:
    gen = torch.Generator().manual_seed(3)
    # Rows with different numbers of labelled tokens, so the three reductions differ.
    rows = [make_batch(gen, 1, 10 + 2 * i) for i in range(4)]
    for i, row in enumerate(rows):
        row["labels"][0, : 9 + i] = -100
        pad = 16 - row["input_ids"].shape[1]
        for key, fill in (("input_ids", 0), ("labels", -100), ("attention_mask", 0)):
            row[key] = torch.nn.functional.pad(row[key], (0, pad), value=fill)
    steps = 2
    big = [concat_batches(rows)] * steps
    small = [concat_batches(rows[:2]), concat_batches(rows[2:])] * steps
    runs = []
    for batches, accum in ((big, 1), (small, 2)):
        model = tiny_model(dtype=torch.float64)
        cfg = TrainConfig(
            **quiet(
                max_steps=steps, grad_accum_steps=accum, output_dir=str(tmp_path / str(accum)), loss_reduction=reduction
            )
        )
        result = Trainer(model, cfg, iter(batches)).train()
        runs.append((result.losses, snapshot(model)))
    (loss_a, w_a), (loss_b, w_b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-10)
    for name in w_a:
        torch.testing.assert_close(w_a[name], w_b[name], rtol=0, atol=1e-6, msg=name)


def test_frozen_parts_unchanged(tmp_path: Path) -> None:
    model = tiny_model()
    before = snapshot(model)
    cfg = TrainConfig(**quiet(max_steps=2, trainable=("merger", "deepstack"), output_dir=str(tmp_path)))
    Trainer(model, cfg, SyntheticBatches()).train()
    names = {id(p): n for n, p in model.named_parameters()}
    for part, moves in (("vision", False), ("llm", False), ("merger", True), ("deepstack", True)):
        changed = [not torch.equal(before[names[id(p)]], p) for p in part_parameters(model, part)]
        assert any(changed) if moves else not any(changed), part


def test_per_part_learning_rates_in_groups_and_metrics(tmp_path: Path) -> None:
    cfg = TrainConfig(
        **quiet(
            max_steps=4, lr=1e-3, lr_vision=1e-4, lr_merger=2e-3, lr_llm=5e-4, warmup_steps=2, output_dir=str(tmp_path)
        )
    )
    result = Trainer(tiny_model(), cfg, SyntheticBatches()).train()
    first, second, _, fourth = result.records
    assert first["lr/vision"] == pytest.approx(0.5e-4) and first["lr/merger"] == pytest.approx(1e-3)
    assert second["lr/llm"] == pytest.approx(5e-4) and second["lr/deepstack"] == pytest.approx(2e-3)
    assert fourth["lr/llm"] == pytest.approx(5e-4 * (0.1 + 0.9 * 0.5))


def test_per_part_rate_scales_the_first_update(tmp_path: Path) -> None:
    """Adam's first step moves each weight by about its group's lr: check the merger vs the LLM."""
    model = tiny_model()
    before = snapshot(model)
    cfg = TrainConfig(
        **quiet(max_steps=1, lr_merger=1e-2, lr_llm=1e-4, lr_vision=1e-3, max_grad_norm=None, output_dir=str(tmp_path))
    )
    Trainer(model, cfg, SyntheticBatches()).train()
    fc = model.model.visual.merger.linear_fc1.weight.detach()
    head = model.lm_head.weight.detach()
    merger_step = (fc - before["model.visual.merger.linear_fc1.weight"]).abs().max()
    llm_step = (head - before["lm_head.weight"]).abs().max()
    assert merger_step == pytest.approx(1e-2, rel=1e-3) and llm_step == pytest.approx(1e-4, rel=1e-3)


def test_nan_step_is_skipped_and_weights_untouched(tmp_path: Path) -> None:
    model = tiny_model()
    remove = nan_hook(model, bad_calls={1})
    states = []
    cfg = TrainConfig(**quiet(max_steps=3, output_dir=str(tmp_path)))
    result = Trainer(model, cfg, SyntheticBatches(), callbacks=[lambda t, r: states.append(snapshot(t.model))]).train()
    remove()
    assert [r["skipped"] for r in result.records] == [False, True, False]
    assert result.skipped_steps == 1 and result.stopped_reason == "max_steps" and result.steps == 3
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])  # bitwise: step 2 changed nothing
    assert any(not torch.equal(states[1][n], states[2][n]) for n in states[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["loss"] == "nan"


def test_repeated_nan_stops_the_run(tmp_path: Path) -> None:
    model = tiny_model()
    before = snapshot(model)
    nan_hook(model, bad_calls=set(range(100)))
    cfg = TrainConfig(**quiet(max_steps=10, max_nan_steps=2, output_dir=str(tmp_path)))
    result = Trainer(model, cfg, SyntheticBatches()).train()
    assert result.steps == 2 and result.skipped_steps == 2
    assert "non-finite loss in 2 consecutive steps" in result.stopped_reason
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_unwritable_output_dir_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    data = SyntheticBatches()
    with pytest.raises(OutputDirError, match="a_file"):
        Trainer(tiny_model(), TrainConfig(**quiet(output_dir=str(blocker / "run"))), data)
    assert data.index == 0  # no batch was drawn


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir_fails(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="not writable"):
            Trainer(tiny_model(), TrainConfig(**quiet(output_dir=str(locked))), SyntheticBatches())
    finally:
        locked.chmod(0o700)


def test_outputs_jsonl_png_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    cfg = TrainConfig(**quiet(max_steps=3, output_dir=str(tmp_path), plot=True, tensorboard=True, progress=True))
    result = Trainer(tiny_model(), cfg, SyntheticBatches(multimodal=False)).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "lr/llm", "grad_norm", "tokens", "tokens_per_s", "skipped"):
        assert key in records[0]
    assert records[0]["tokens"] == 2 * 16
    assert result.plot == tmp_path / "loss_curve.png" and result.plot.read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert result.checkpoint == tmp_path / "checkpoint-00000003"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_progress_bar_only_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal: bool) -> None:
    # a run logged to a file (CI, nohup, `> log`) must not fill it with bar frames
    pytest.importorskip("tqdm")
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logger = MetricsLogger(tmp_path, total_steps=2, progress=True)
    for step in (1, 2):
        logger.log({"step": step, "loss": 0.5})
    logger.close()
    assert ("train" in stream.getvalue()) is terminal, stream.getvalue()


def test_data_exhausted_and_eval(tmp_path: Path) -> None:
    data = SyntheticBatches()
    batches = [data.batch(i) for i in range(3)]
    cfg = TrainConfig(**quiet(max_steps=5, output_dir=str(tmp_path)))
    result = Trainer(tiny_model(), cfg, batches, eval_batches=batches[:1]).train()
    assert result.steps == 3 and result.stopped_reason == "data_exhausted"
    assert result.eval_loss is not None and 0 < result.eval_loss < 10


def test_moe_aux_loss_and_activation_checkpointing(tmp_path: Path) -> None:
    runs = []
    for ckpt in (False, True):
        model = tiny_model(moe=True, aux_coef=0.01)
        cfg = TrainConfig(**quiet(max_steps=2, activation_checkpointing=ckpt, output_dir=str(tmp_path / str(ckpt))))
        runs.append(Trainer(model, cfg, SyntheticBatches()).train().records)
    plain, recomputed = runs
    assert plain[0]["moe_aux_loss"] > 0
    assert [r["loss"] for r in plain] == pytest.approx([r["loss"] for r in recomputed], rel=1e-5)


def test_packed_segments_are_scored_per_sample(tmp_path: Path) -> None:
    """A packed row of two samples gives the same first loss as the two samples in separate rows."""
    gen = torch.Generator().manual_seed(5)
    a, b = make_batch(gen, 1, 10, multimodal=False), make_batch(gen, 1, 10, multimodal=False)
    packed = {k: torch.cat([a[k], b[k]], dim=1) for k in ("input_ids", "labels", "attention_mask")}
    packed["labels"][0, 10] = -100  # the packer unscores each sample's first token
    packed["segment_ids"] = torch.tensor([[0] * 10 + [1] * 10])
    separate = concat_batches([a, b])
    losses = []
    for name, batch in (("packed", packed), ("separate", separate)):
        cfg = TrainConfig(**quiet(max_steps=1, output_dir=str(tmp_path / name)))
        losses.append(Trainer(tiny_model(), cfg, [batch]).train().losses[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # And the reference computation agrees on the sqrt reduction of two samples.
    model = tiny_model()
    with torch.no_grad():
        hidden = model.model(input_ids=separate["input_ids"]).last_hidden_state
        ref = lm_loss(hidden, model.lm_head.weight, shift_labels(separate["labels"]), reduction="sqrt").loss
    assert losses[1] == pytest.approx(float(ref), rel=1e-5)


def test_bf16_autocast_when_forced(tmp_path: Path) -> None:
    """``bf16=True`` autocasts even on CPU; ``"auto"`` (CPU here) keeps float32 (the exact-loss tests)."""
    seen: list[torch.dtype] = []
    model = tiny_model()
    linear = next(m for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    result = Trainer(
        model, TrainConfig(**quiet(max_steps=2, bf16=True, output_dir=str(tmp_path))), SyntheticBatches()
    ).train()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert model.lm_head.weight.dtype == torch.float32  # master weights stay float32
    assert torch.bfloat16 in seen


def test_a_global_batch_without_labels_is_an_error_naming_its_samples(tmp_path: Path) -> None:
    batch = SyntheticBatches().batch(0)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    batch["sample_ids"] = [["photo-1"], ["photo-2"]]
    cfg = TrainConfig(**quiet(max_steps=1, output_dir=str(tmp_path)))
    with pytest.raises(
        ValueError, match=r"step 1: no labelled token in the global batch \(samples \['photo-1', 'photo-2'\]\)"
    ):
        Trainer(tiny_model(), cfg, iter([batch])).train()
