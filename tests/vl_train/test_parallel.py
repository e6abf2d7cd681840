"""FSDP2 over 2 gloo processes equals one process on the full batch; activation checkpointing; torchrun helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fsdp_worker import ROWS, SCENARIOS, build_model, global_batch, rows_of, train

from vl_train import parallel
from vl_train.losses import lm_loss
from vl_train.parallel import checkpoint_blocks, parallelize, root_forward, shard_units

DIST = torch.distributed.is_available() and torch.distributed.is_gloo_available()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not DIST, reason="torch.distributed with the gloo backend is unavailable")
def test_two_fsdp_ranks_equal_one_process(tmp_path):
    worker = Path(__file__).with_name("_fsdp_worker.py")
    out_file = tmp_path / "fsdp.pt"
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(out_file)],
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
    results = torch.load(out_file)
    for name, (_, tie) in SCENARIOS.items():
        got = results[name]
        assert got["sharded"], f"{name}: some parameters are not FSDP shards"
        assert got["tied"] == tie, name
        model = build_model(tie)
        grads: dict[str, torch.Tensor] = {}
        want = train(model, (0, ROWS), world=1, first_grads=grads)
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want), rtol=1e-5, atol=0, msg=name)
        assert set(got["grads"]) == set(grads), name
        for key, g in grads.items():
            torch.testing.assert_close(got["grads"][key], g, rtol=1e-4, atol=1e-6, msg=f"{name}: grad {key}")
        assert want[0] != want[-1]  # the three steps did train
        state = model.state_dict()
        assert set(got["state"]) == set(state), name
        for key, value in state.items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-5, msg=f"{name}: {key}")


def _loss_and_grads(model):
    batch = rows_of(global_batch(0), 0, ROWS)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state
    loss = lm_loss(hidden[:, :-1], model.lm_head.weight, batch["labels"][:, 1:], reduction="sqrt").loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpoint_blocks_same_loss_and_grads_and_recomputes():
    plain_loss, plain_grads = _loss_and_grads(build_model())
    model = build_model()
    names = checkpoint_blocks(model)
    assert checkpoint_blocks(model) == names  # idempotent: one wrapper per block
    assert len(names) == 3 + 2 and names[0] == "model.language_model.layers.0"
    calls = []
    # attention runs before the block's last saved tensor, so the (early-stopping) recompute reaches it
    model.model.language_model.layers[1].self_attn.register_forward_hook(lambda *_: calls.append(1))
    model.model.visual.blocks[0].attn.register_forward_hook(lambda *_: calls.append(2))
    loss, grads = _loss_and_grads(model)
    assert sorted(calls) == [1, 1, 2, 2]  # forward + recompute in backward
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert grads.keys() == plain_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in build_model().named_parameters()]


def test_checkpointed_block_rejects_a_kv_cache():
    model = build_model()
    checkpoint_blocks(model)
    batch = rows_of(global_batch(0), 0, 2)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="use_cache=False"):
        model.model(**inputs, use_cache=True)
    with torch.no_grad():  # no recompute without grad: a cache is fine (generation)
        model.model(**inputs, use_cache=True)


def test_shard_units_follow_the_layout():
    names = [n for n, _ in shard_units(build_model())]
    assert names == [
        "model.visual.blocks.0",
        "model.visual.blocks.1",
        "model.visual.merger",
        "model.visual.deepstack_merger_list",
        "model.language_model.layers.0",
        "model.language_model.layers.1",
        "model.language_model.layers.2",
    ]
    with pytest.raises(ValueError, match=r"Sequential has no decoder_layers\(\) / vision_tower\(\)"):
        shard_units(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_parallelize_needs_a_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_distributed"):
        parallelize(build_model())


def test_root_forward_without_fsdp_calls_the_function():
    model = torch.nn.Linear(3, 2)
    x = torch.ones(3)
    out = root_forward(model, lambda v, scale=1.0: model.weight @ v * scale, x, scale=2.0)
    torch.testing.assert_close(out, model.weight @ x * 2.0)


def test_single_process_helpers(monkeypatch):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert parallel.init_distributed() is False
    assert (parallel.world_size(), parallel.rank(), parallel.is_main_process()) == (1, 0, True)
    parallel.barrier()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parallel.init_distributed("gloo") is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match=r"\['MASTER_ADDR', 'MASTER_PORT'\] are not set"):
        parallel.init_distributed()


def test_run_launched_runs_alone_or_names_a_bad_launch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert parallel.run_launched("vl-x", lambda: 7) == 7
    monkeypatch.setenv("WORLD_SIZE", "2")
    ran: list[int] = []
    assert parallel.run_launched("vl-x", lambda: ran.append(1) or 0) == 2 and not ran
    assert "vl-x: error: WORLD_SIZE=2 but ['RANK', 'MASTER_ADDR', 'MASTER_PORT'] are not set" in capsys.readouterr().err
