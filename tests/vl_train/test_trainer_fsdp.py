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
from _trainer_fsdp_worker import STEPS, batches, config
from _trainer_helpers import tiny_model
from safetensors.torch import load_file

from vl_train.trainer import Trainer

DIST = torch.distributed.is_available() and torch.distributed.is_gloo_available()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not DIST, reason="torch.distributed with the gloo backend is unavailable")
def test_two_fsdp_ranks_train_like_one_process(tmp_path):
    worker = Path(__file__).with_name("_trainer_fsdp_worker.py")
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(tmp_path)],
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
    got = torch.load(tmp_path / "losses.pt")

    model = tiny_model()
    want = Trainer(model, config(tmp_path / "single"), batches()).train()
    assert len(want.losses) == STEPS and want.losses[0] != want.losses[-1]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want.losses), rtol=1e-5, atol=0)

    # rank 0 alone wrote the files: one metrics line per step, a full (unsharded) checkpoint
    run = tmp_path / "run"
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
