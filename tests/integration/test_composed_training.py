"""Composed models through every trainer: the same losses as the core model where the two are the same network.

The composed twin (our tower + transformers' Qwen3 LM with MRoPE, the core model's weights) must train,
distil and do RL exactly like the core ``VLForConditionalGeneration``, on one process and on 2 FSDP2 gloo
ranks; other LM families (Qwen2, Llama) and a SigLIP-2 tower train through the same ``Trainer``.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _composed import composed, composed_twin
from _runs import rl_run, train_run
from _trainer_helpers import SyntheticBatches, quiet, tiny_model

from vl_train import Distill, TrainConfig, Trainer
from vl_train.distill_run import DistillTrainer

DIST = torch.distributed.is_available() and torch.distributed.is_gloo_available()


def _as_core_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A composed twin's state dict under the core model's parameter names."""
    out = {}
    for key, value in state.items():
        if key.startswith("visual."):
            out["model." + key] = value
        elif key.startswith("language_model.model."):
            out["model.language_model." + key.removeprefix("language_model.model.")] = value
        else:
            out[key.removeprefix("language_model.")] = value
    return out


def _assert_same_weights(core_state: dict[str, torch.Tensor], twin_state: dict[str, torch.Tensor]) -> None:
    renamed = _as_core_names(twin_state)
    assert set(renamed) == set(core_state)
    for key, value in core_state.items():
        torch.testing.assert_close(renamed[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_trainer_composed_twin_equals_core(tmp_path: Path) -> None:
    core, want = train_run(tmp_path / "core", core=True)
    twin, got = train_run(tmp_path / "twin")
    assert len(got.losses) == 3 and got.losses[0] != got.losses[-1]
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(want.losses), rtol=1e-5, atol=0)
    _assert_same_weights(core.state_dict(), twin.state_dict())


def _siglip2_composed() -> Any:
    from transformers import Qwen3Config, Siglip2VisionConfig, Siglip2VisionModel

    from vl_model import compose

    torch.manual_seed(0)
    tower = Siglip2VisionModel(
        Siglip2VisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=4,
            num_patches=64,
        )
    )
    core = tiny_model(0)
    text = core.config.text_config
    lm = Qwen3Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    ids = {k: getattr(core.config, k) for k in ("image_token_id", "video_token_id")}
    ids.update(
        vision_start_token_id=core.config.vision_start_token_id, vision_end_token_id=core.config.vision_end_token_id
    )
    return compose(tower, lm, deepstack_visual_indexes=[0, 1], temporal_patch_size=2, **ids)


@pytest.mark.parametrize("family", ["qwen2", "llama", "siglip2-qwen3"])
def test_other_lm_families_and_a_siglip2_tower_train(tmp_path: Path, family: str) -> None:
    model = _siglip2_composed() if family == "siglip2-qwen3" else composed(family)
    batch = SyntheticBatches(seed=5, rows=2, length=16).batch(0)
    cfg = TrainConfig(**quiet(max_steps=6, lr=3e-3, output_dir=str(tmp_path)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = Trainer(model, cfg, itertools.repeat(batch)).train()
    assert result.skipped_steps == 0 and result.losses[-1] < result.losses[0]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("visual.merger") for k in changed) and any(k.startswith("language_model") for k in changed)


@pytest.mark.parametrize(("mode", "loss"), [("off_policy", "forward_kl"), ("on_policy", "reverse_kl")])
def test_distill_trainer_composed_student_equals_core(tmp_path: Path, mode: str, loss: str) -> None:
    from _cli_helpers import prompt_batch

    teacher = tiny_model(seed=9).eval()
    kw: dict[str, Any] = {"max_new_tokens": 3} if mode == "on_policy" else {}
    cfg = Distill(mode, loss, **kw, **quiet(max_steps=2, loss_reduction="token", output_dir=str(tmp_path)))
    if mode == "on_policy":
        batch = prompt_batch()
        vocab = tiny_model().config.text_config.vocab_size
        batch["input_ids"] = batch["input_ids"] % 250  # the tiny model's token ids, placeholders kept below
        from _trainer_helpers import IMAGE, VISION_END, VISION_START

        ids = batch["input_ids"]
        ids[0, 3], ids[0, 4:8], ids[0, 8] = VISION_START, IMAGE, VISION_END
        assert int(ids.max()) < vocab
        batches: list[dict[str, torch.Tensor]] = [batch, batch]
    else:
        source = SyntheticBatches(seed=4, rows=2, length=16)
        batches = [source.batch(0), source.batch(1)]
    results = []
    for student in (tiny_model(), composed_twin(tiny_model())):
        torch.manual_seed(123)
        results.append(
            DistillTrainer(
                student, teacher, cfg.replace(output_dir=str(tmp_path / str(len(results)))), iter(batches)
            ).train()
        )
    (want, got) = results
    assert got.steps == 2 and got.skipped_steps == 0
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(want.losses), rtol=1e-5, atol=1e-7)


def test_rl_trainer_composed_twin_equals_core(tmp_path: Path) -> None:
    core, want = rl_run(tmp_path / "core", core=True)
    twin, got = rl_run(tmp_path / "twin")
    losses = [r["loss"] for r in got.records]
    assert len(losses) == 2 and all(r["no_signal"] is False for r in got.records)
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor([r["loss"] for r in want.records]), rtol=1e-5, atol=1e-7
    )
    _assert_same_weights(core.state_dict(), twin.state_dict())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(out: Path, kind: str) -> dict[str, Any]:
    worker = Path(__file__).with_name("_composed_worker.py")
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(out), kind],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    try:
        logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return torch.load(out / "result.pt", weights_only=True)


@pytest.mark.skipif(not DIST, reason="torch.distributed with the gloo backend is unavailable")
@pytest.mark.parametrize("kind", ["train", "rl"])
def test_two_fsdp_ranks_train_the_composed_model_like_one_process(tmp_path: Path, kind: str) -> None:
    got = _launch(tmp_path / "two", kind)
    run = train_run if kind == "train" else rl_run
    core, want = run(tmp_path / "one", core=True)
    # an RL run's losses are its steps' mean policy losses over the global batch
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want.losses), rtol=1e-5, atol=1e-7)
    _assert_same_weights(core.state_dict(), got["state"])
