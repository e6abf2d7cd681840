"""The ``Trainer`` on 2 FSDP2 ranks (gloo) gives the losses and weights of one process on the full batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _trainer_fsdp_worker import ACCUM, STEPS, batches, config
from _trainer_helpers import tiny_model
from safetensors.torch import load_file

from vl_train.trainer import Trainer

DIST = torch.distributed.is_available() and torch.distributed.is_gloo_available()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(out_dir: Path, *args: str, moe: bool = False) -> None:
    """Run the 2-rank worker on ``out_dir`` (extra ``args``: STOP RESUME) and fail with both logs if a rank fails."""
    worker = Path(__file__).with_name("_trainer_fsdp_worker.py")
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env["OMP_NUM_THREADS"], env["VL_TEST_MOE"] = "1", "1" if moe else "0"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(out_dir), *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    try:
        logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of one uninterrupted 2-rank run of ``STEPS`` steps."""
    out = tmp_path_factory.mktemp("fsdp")
    _launch(out)
    return out


@pytest.mark.skipif(not DIST, reason="torch.distributed with the gloo backend is unavailable")
def test_two_fsdp_ranks_train_like_one_process(two_rank_run: Path, tmp_path: Path) -> None:
    got = torch.load(two_rank_run / "losses.pt")

    model = tiny_model()
    want = Trainer(model, config(tmp_path / "single"), batches()).train()
    assert len(want.losses) == STEPS and want.losses[0] != want.losses[-1]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want.losses), rtol=1e-5, atol=0)

    # rank 0 alone wrote the files: one metrics line per step, a full (unsharded) checkpoint
    run = two_rank_run / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert Path(got["checkpoint"]) == run / f"checkpoint-{STEPS:08d}"
    saved = load_file(str(Path(got["checkpoint"]) / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=key)
    optim = torch.load(Path(got["checkpoint"]) / "trainer_state.pt", weights_only=True)["optimizer"]
    assert optim["state"], "the optimiser state was not gathered"


@pytest.mark.skipif(not DIST, reason="torch.distributed with the gloo backend is unavailable")
def test_two_fsdp_ranks_stop_and_resume_exactly(two_rank_run: Path, tmp_path: Path) -> None:
    _launch(tmp_path, "1", "0")  # stop after step 1 (checkpoint-1 written by both ranks together)
    first = tmp_path / "run" / "checkpoint-00000001"
    # every rank's data position and RNG states are in the checkpoint: 2 micro-batches drawn per step
    for r in range(2):
        state = torch.load(first / f"data-rank{r}.pt", weights_only=True)
        assert state["data"] == {"index": ACCUM} and "rng" in state
    _launch(tmp_path, "0", "1")  # resume to STEPS
    want = torch.load(two_rank_run / "losses.pt")
    got = torch.load(tmp_path / "losses.pt")
    assert len(got["losses"]) == STEPS
    assert got["losses"] == want["losses"]  # bitwise: same kernels, same reduction order
    full = load_file(str(two_rank_run / "run" / f"checkpoint-{STEPS:08d}" / "model.safetensors"))
    resumed = load_file(str(Path(got["checkpoint"]) / "model.safetensors"))
    assert set(full) == set(resumed)
    for key, value in full.items():
        assert torch.equal(resumed[key], value), key


@pytest.mark.skipif(not DIST, reason="torch.distributed with the gloo backend is unavailable")
def test_two_rank_checkpoint_refuses_a_single_process_resume(two_rank_run: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path / "one").replace(progress=False, tensorboard=False)
    with pytest.raises(ValueError, match="written by 2 ranks"):
        Trainer(tiny_model(), cfg, batches(), resume=two_rank_run / "run")


@pytest.mark.skipif(not DIST, reason="torch.distributed with the gloo backend is unavailable")
def test_global_moe_balance_over_two_ranks_equals_one_process(tmp_path: Path) -> None:
    # expert counts all-reduced over micro-batches and ranks: the same balance loss and updates as one process
    _launch(tmp_path, moe=True)
    got = torch.load(tmp_path / "losses.pt")
    model = tiny_model(moe=True, aux_coef=0.5)
    want = Trainer(model, config(tmp_path / "single", moe=True), batches()).train()
    aux = [r["moe_aux_loss"] for r in want.records]
    assert all(a > 0 for a in aux)
    torch.testing.assert_close(torch.tensor(got["aux"]), torch.tensor(aux), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want.losses), rtol=1e-5, atol=0)
    saved = load_file(str(Path(got["checkpoint"]) / "model.safetensors"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=key)
