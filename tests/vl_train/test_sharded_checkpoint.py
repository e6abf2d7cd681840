"""Sharded checkpoints (``checkpoint_format = "sharded"``, ``torch.distributed.checkpoint``).

Every rank writes its own shards (no gather on rank 0) into the usual atomic, checksummed checkpoint
folder; a 2-rank run resumes exactly from it on 2 ranks and, resharded, on one process; a Hugging Face
checkpoint is exported from it on one process; a corrupted shard makes resume fall back to the
previous checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _launch import GLOO, launch
from _trainer_fsdp_worker import STEPS, batches, config
from _trainer_helpers import tiny_model

from vl_model import VLForConditionalGeneration
from vl_train.checkpoint import latest_valid_checkpoint
from vl_train.dcp_checkpoint import export_pretrained, is_sharded_checkpoint
from vl_train.trainer import Trainer

WORKER = Path(__file__).with_name("_trainer_fsdp_worker.py")
SHARDED = {"VL_TEST_CHECKPOINT_FORMAT": "sharded"}


def _exported(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    export_pretrained(checkpoint, tiny_model(seed=99), out)
    return VLForConditionalGeneration.from_pretrained(str(out)).state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted 2-rank sharded run, and one stopped after step 1 then resumed on 2 ranks."""
    whole, split = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("split")
    launch(WORKER, str(whole), env=SHARDED)
    launch(WORKER, str(split), "1", "0", env=SHARDED)
    stopped = tmp_path_factory.mktemp("stopped") / "checkpoint-00000001"
    shutil.copytree(split / "run" / "checkpoint-00000001", stopped)  # kept for the one-process resume
    launch(WORKER, str(split), "0", "1", env=SHARDED)
    return {"whole": whole, "split": split, "stopped": stopped}


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_every_rank_writes_its_shards_and_the_run_resumes_exactly(runs: dict[str, Path], tmp_path: Path) -> None:
    stopped = runs["stopped"]
    assert is_sharded_checkpoint(stopped) and not (stopped / "model.safetensors").exists()
    meta = json.loads((stopped / "meta.json").read_text())
    assert meta["extra"]["world_size"] == 2
    for name in ("sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata", "data-rank1.pt"):
        assert (stopped / name).is_file() and name in meta["files"], name
    want = torch.load(runs["whole"] / "losses.pt")
    got = torch.load(runs["split"] / "losses.pt")
    assert len(got["losses"]) == STEPS and got["losses"] == want["losses"]  # bitwise
    full = _exported(Path(want["checkpoint"]), tmp_path / "whole")
    resumed = _exported(Path(got["checkpoint"]), tmp_path / "split")
    for key, value in full.items():
        assert torch.equal(resumed[key], value), key


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_a_two_rank_checkpoint_resumes_on_one_process(runs: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_model()
    result = Trainer(model, config(tmp_path / "one"), batches(), resume=runs["stopped"]).train()
    want = torch.load(runs["whole"] / "losses.pt")
    assert result.steps == STEPS and result.losses[0] == want["losses"][0]  # step 1 comes from the checkpoint
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(want["losses"]), rtol=1e-5, atol=0)
    full = _exported(Path(want["checkpoint"]), tmp_path / "whole")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, full[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_the_exported_hugging_face_checkpoint_holds_one_process_weights(runs: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_model()
    Trainer(model, config(tmp_path / "one"), batches()).train()  # one process on the full batches
    got = _exported(runs["whole"] / "run", tmp_path / "hf")  # a run folder: its newest valid checkpoint
    assert set(got) == set(model.state_dict())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_corrupted_shard_falls_back_to_the_previous_checkpoint(tmp_path: Path) -> None:
    cfg = config(tmp_path / "run").replace(checkpoint_format="sharded", save_every=1, keep_last=3, max_steps=2)
    Trainer(tiny_model(), cfg, batches()).train()
    newest = tmp_path / "run" / "checkpoint-00000002"
    assert is_sharded_checkpoint(newest)
    shard = newest / "sharded" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert latest_valid_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-00000001"
    trainer = Trainer(tiny_model(), cfg, batches(), resume=True)
    assert trainer.step == 1 and trainer.resumed_from == tmp_path / "run" / "checkpoint-00000001"
    with pytest.raises(ValueError, match="corrupted"):
        Trainer(tiny_model(), cfg.replace(output_dir=str(tmp_path / "other")), batches(), resume=newest)
