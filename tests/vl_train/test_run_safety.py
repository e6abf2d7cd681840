"""Runs never lose work: another run's folder, SIGINT/SIGTERM, stale temporary folders, corrupted checkpoints,
pruning, changed settings on resume, and the CLI's --resume / --overwrite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _trainer_helpers import SyntheticBatches, quiet, tiny_model

from vl_train.checkpoint import checkpoint_problem, latest_valid_checkpoint, list_checkpoints, save_checkpoint
from vl_train.config import OptimConfig, TrainConfig
from vl_train.optim import build_optimizer, build_scheduler
from vl_train.run_safety import OutputDirError, config_changes
from vl_train.trainer import Trainer


def _cfg(out: Path, **overrides: Any) -> TrainConfig:
    return TrainConfig(
        **quiet(**{"max_steps": 4, "save_every": 1, "keep_last": 0, "output_dir": str(out), **overrides})
    )


def test_a_fresh_run_refuses_a_folder_holding_another_run(tmp_path: Path) -> None:
    first = Trainer(tiny_model(), _cfg(tmp_path, max_steps=2), SyntheticBatches()).train()
    assert first.steps == 2
    with pytest.raises(
        OutputDirError, match=r"already holds a run \(checkpoint-00000001, checkpoint-00000002, metrics"
    ):
        Trainer(tiny_model(), _cfg(tmp_path), SyntheticBatches())
    assert len(list_checkpoints(tmp_path)) == 2  # nothing was touched
    again = Trainer(tiny_model(), _cfg(tmp_path, max_steps=1, keep_last=1), SyntheticBatches(), overwrite=True).train()
    assert again.steps == 1 and [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000001"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]


def _kill_at(step: int, signum: int) -> Any:
    def callback(trainer: Trainer, record: dict[str, Any]) -> None:
        if record["step"] == step:
            os.kill(os.getpid(), signum)

    return callback


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_resume_continues_exactly(tmp_path: Path, signum: int) -> None:
    full = Trainer(tiny_model(), _cfg(tmp_path / "full"), SyntheticBatches(seed=2)).train()
    stopped = Trainer(
        tiny_model(), _cfg(tmp_path / "run"), SyntheticBatches(seed=2), callbacks=[_kill_at(2, signum)]
    ).train()
    name = signal.Signals(signum).name
    assert stopped.stopped_reason == f"interrupted ({name})" and stopped.steps == 2
    assert stopped.checkpoint is not None and stopped.checkpoint.name == "checkpoint-00000002"
    trainer = Trainer(tiny_model(seed=5), _cfg(tmp_path / "run"), SyntheticBatches(seed=2), resume=True)
    assert trainer.resumed_from == stopped.checkpoint and trainer.step == 2
    resumed = trainer.train()
    assert resumed.losses == full.losses and resumed.stopped_reason == "max_steps"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_stale_temporary_folders_are_removed(tmp_path: Path) -> None:
    Trainer(tiny_model(), _cfg(tmp_path, max_steps=1), SyntheticBatches()).train()
    stale = tmp_path / ".tmp-checkpoint-00000002-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    Trainer(tiny_model(), _cfg(tmp_path, max_steps=2), SyntheticBatches(), resume=True).train()
    assert not stale.exists()


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flat = {"min_lr_ratio": 1.0}  # a constant rate: the 4-step and 5-step runs share their first steps exactly
    full = Trainer(tiny_model(), _cfg(tmp_path / "full", max_steps=5, **flat), SyntheticBatches(seed=1)).train()
    Trainer(tiny_model(), _cfg(tmp_path / "run", max_steps=4, **flat), SyntheticBatches(seed=1)).train()
    latest = tmp_path / "run" / "checkpoint-00000004"
    _corrupt(latest / "model.safetensors")
    assert "does not match its recorded SHA-256" in (checkpoint_problem(latest) or "")
    with caplog.at_level("WARNING"):
        trainer = Trainer(
            tiny_model(), _cfg(tmp_path / "run", max_steps=5, **flat), SyntheticBatches(seed=1), resume=True
        )
    assert trainer.step == 3 and "checkpoint-00000004 is not valid" in caplog.text
    resumed = trainer.train()
    assert resumed.losses == full.losses  # steps 4 and 5 redone from step 3's state
    assert checkpoint_problem(tmp_path / "run" / "checkpoint-00000004") is None  # rewritten by the resumed run
    with pytest.raises(ValueError, match=r"is corrupted: trainer_state\.pt"):
        _corrupt(tmp_path / "run" / "checkpoint-00000005" / "trainer_state.pt")
        Trainer(
            tiny_model(), _cfg(tmp_path / "other"), SyntheticBatches(), resume=tmp_path / "run" / "checkpoint-00000005"
        )


def test_pruning_keeps_other_runs_and_later_steps(tmp_path: Path) -> None:
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig())
    sched = build_scheduler(opt, OptimConfig(), max_steps=9)
    common = {"model": model, "optimizer": opt, "scheduler": sched}
    save_checkpoint(tmp_path, step=1, run_id="other", **common)
    save_checkpoint(tmp_path, step=8, run_id="mine", **common)  # a later step left by a fallback
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step=step, run_id="mine", keep_last=2, **common)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["checkpoint-00000001", "checkpoint-00000003", "checkpoint-00000004", "checkpoint-00000008"]
    assert latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoint-00000008"


def test_resuming_with_changed_settings_names_them(tmp_path: Path) -> None:
    Trainer(tiny_model(), _cfg(tmp_path, max_steps=2), SyntheticBatches()).train()
    changed = _cfg(tmp_path, max_steps=2, micro_batch_size=3, lr=5e-4)
    with pytest.raises(ValueError, match=r"changed settings \(micro_batch_size: 1 -> 3; optim.lr: 0.001 -> 0.0005\)"):
        Trainer(tiny_model(), changed, SyntheticBatches(), resume=True)
    longer = Trainer(tiny_model(), _cfg(tmp_path, max_steps=3, progress=True), SyntheticBatches(), resume=True)
    assert longer.train().steps == 3  # running longer or writing other files is no change of the run
    assert config_changes({"optim": {"lr": 1.0}, "seed": 1}, {"optim": {"lr": 1.0}, "seed": 1}) == []


def _cli(args: list[str], **popen: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vl_train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_cli_ctrl_c_resume_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    quick = ["--set", "data.size=16", "--set", "train.save_every=0", "--set", "train.plot=false"]
    proc = _cli(["demo_s0", "--output", str(out), "--set", "train.max_steps=400", *quick])
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted (SIGINT) at step" in stderr and "--resume" in stderr
    done = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert done == list(range(1, len(done) + 1)) and list_checkpoints(out)[-1].name == f"checkpoint-{done[-1]:08d}"
    again = _cli(["demo_s0", "--output", str(out), "--set", f"train.max_steps={done[-1] + 2}", *quick])
    assert again.wait(timeout=120) == 2 and "already holds a run" in again.communicate()[1]
    resumed = _cli(["demo_s0", "--output", str(out), "--set", f"train.max_steps={done[-1] + 2}", "--resume", *quick])
    stdout, stderr = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, stderr
    assert f"resumed from {list_checkpoints(out)[-2]} at step {done[-1]}" in stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, done[-1] + 3))
    fresh = _cli(["demo_s0", "--output", str(out), "--set", "train.max_steps=1", "--overwrite", *quick])
    assert fresh.wait(timeout=120) == 0, fresh.communicate()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
