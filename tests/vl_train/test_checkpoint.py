"""Tests of atomic checkpoints and of exact resumption after a SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _trainer_helpers import SyntheticBatches, quiet, tiny_model

from vl_train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, rng_state, save_checkpoint
from vl_train.config import OptimConfig, TrainConfig
from vl_train.optim import build_optimizer, build_scheduler
from vl_train.trainer import Trainer

WORKER = Path(__file__).with_name("_resume_worker.py")


def run_worker(out: Path, steps: int, kill_after: int, resume: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(WORKER), str(out), str(steps), str(kill_after), "1" if resume else "0"]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=False)


def test_sigkill_then_resume_reproduces_the_losses_exactly(tmp_path: Path) -> None:
    steps, kill_after = 6, 3
    full = run_worker(tmp_path / "full", steps, 0, False)
    assert full.returncode == 0, full.stderr
    killed = run_worker(tmp_path / "cut", steps, kill_after, False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert latest_checkpoint(tmp_path / "cut") == tmp_path / "cut" / f"checkpoint-{kill_after:08d}"
    assert not (tmp_path / "cut" / "losses.json").exists()
    resumed = run_worker(tmp_path / "cut", steps, 0, True)
    assert resumed.returncode == 0, resumed.stderr
    want = json.loads((tmp_path / "full" / "losses.json").read_text())
    got = json.loads((tmp_path / "cut" / "losses.json").read_text())
    assert len(want) == steps and got == want  # bitwise: the repr of every float is equal
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))


def test_in_process_resume_continues_weights_and_data(tmp_path: Path) -> None:
    cfg = TrainConfig(**quiet(max_steps=4, save_every=2, keep_last=5, output_dir=str(tmp_path / "a")))
    full_model = tiny_model()
    full = Trainer(full_model, cfg, SyntheticBatches()).train()
    stop_at_2 = [lambda trainer, record: record["step"] == 2]
    half = Trainer(
        tiny_model(), cfg.replace(output_dir=str(tmp_path / "b")), SyntheticBatches(), callbacks=stop_at_2
    ).train()
    assert half.stopped_reason == "callback" and half.checkpoint is not None
    data = SyntheticBatches()
    resumed_model = tiny_model(seed=1)  # different init: everything must come from the checkpoint
    resumed = Trainer(resumed_model, cfg.replace(output_dir=str(tmp_path / "b")), data, resume=half.checkpoint).train()
    assert data.index == 4
    assert resumed.losses == full.losses
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_true_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    cfg = TrainConfig(**quiet(max_steps=1, output_dir=str(tmp_path)))
    assert Trainer(tiny_model(), cfg, SyntheticBatches(), resume=True).train().steps == 1
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        Trainer(tiny_model(), cfg, SyntheticBatches(), resume=tmp_path / "elsewhere")


def _parts(tmp_path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    model = tiny_model()
    cfg = OptimConfig()
    opt = build_optimizer(model, cfg)
    return model, opt, build_scheduler(opt, cfg, max_steps=5)


def test_checkpoint_roundtrip_and_atomic_layout(tmp_path: Path) -> None:
    model, opt, sched = _parts(tmp_path)
    sum(p.sum() for p in model.parameters()).backward()  # type: ignore[union-attr]
    opt.step()
    sched.step()  # type: ignore[attr-defined]
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = save_checkpoint(
        tmp_path, step=7, model=model, optimizer=opt, scheduler=sched, data_state={"index": 9}, metrics=[{"step": 7}]
    )
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "trainer_state.pt"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary folder is gone
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    model2, opt2, sched2 = _parts(tmp_path)
    ckpt = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws
    assert ckpt.step == 7 and ckpt.data_state == {"index": 9} and ckpt.metrics == [{"step": 7}]
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert str(opt.state_dict()) == str(opt2.state_dict())
    assert sched.state_dict() == sched2.state_dict()  # type: ignore[attr-defined]


def test_leftovers_and_incomplete_checkpoints_are_ignored(tmp_path: Path) -> None:
    model, opt, sched = _parts(tmp_path)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step=step, model=model, optimizer=opt, scheduler=sched, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002", "checkpoint-00000003"]
    (tmp_path / ".tmp-checkpoint-00000009-x").mkdir()  # a write cut short by a crash
    (tmp_path / "checkpoint-00000008").mkdir()  # no meta.json: incomplete
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000003"
    with pytest.raises(FileNotFoundError, match=r"meta\.json"):
        load_checkpoint(tmp_path / "checkpoint-00000008", model=model)
    assert latest_checkpoint(tmp_path / "missing") is None


def test_rewriting_a_step_and_tied_weights(tmp_path: Path) -> None:
    model, opt, sched = _parts(tmp_path)
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # tie: shared storage
    save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched)
    other = tiny_model(seed=4)
    other.lm_head.weight = other.model.language_model.embed_tokens.weight
    load_checkpoint(path, model=other, restore_rng=False)
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)


def test_mismatched_model_is_named(tmp_path: Path) -> None:
    model, opt, sched = _parts(tmp_path)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched)
    with pytest.raises(ValueError, match="unexpected"):
        load_checkpoint(path, model=torch.nn.Linear(2, 2))
    assert rng_state()["torch"].dtype == torch.uint8


def test_extra_files_are_written_inside_the_atomic_folder(tmp_path: Path) -> None:
    model, opt, sched = _parts(tmp_path)
    extra = {"data-rank0.pt": {"data": {"index": 1}}, "data-rank1.pt": {"data": {"index": 2}}}
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra_files=extra)
    assert sorted(p.name for p in path.iterdir()) == [
        "data-rank0.pt",
        "data-rank1.pt",
        "meta.json",
        "model.safetensors",
        "trainer_state.pt",
    ]
    assert torch.load(path / "data-rank1.pt", weights_only=True) == {"data": {"index": 2}}
    for bad in ("meta.json", "../x.pt", "sub/x.pt", ".hidden"):
        with pytest.raises(ValueError, match="not plain file names"):
            save_checkpoint(tmp_path, step=2, model=model, optimizer=opt, scheduler=sched, extra_files={bad: 1})
    assert [p.name for p in list_checkpoints(tmp_path)] == [path.name]  # nothing half-written


def test_single_process_resume_of_a_multi_rank_checkpoint_is_refused(tmp_path: Path) -> None:
    from vl_train.run_checkpoint import load_run_checkpoint

    model, opt, sched = _parts(tmp_path)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra={"world_size": 4})
    with pytest.raises(ValueError, match="written by 4 ranks; resume it with 4"):
        load_run_checkpoint(path, model, opt, sched)
