"""Ranks holding different modalities (text only, images, videos, both) train like one process on all rows.

Without one tower pass per forward on every rank (a zero-weighted placeholder where a rank has no
pixels), the sharded tower's collectives do not match: gloo raises "Received data size doesn't match",
NCCL hangs. Two FSDP2 gloo ranks must give the losses and weights of one process on the concatenated
rows, for the supervised ``Trainer`` (core and composed models), the ``RLTrainer`` and the
``DistillTrainer`` (on-policy: it finishes, as sampling differs from one process), and greedy
generation by the sharded model must give one process's tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _launch import GLOO, launch
from _mixed import SCENARIOS, distill_run, mixed_prompts, mixed_run

WORKER = Path(__file__).with_name("_mixed_worker.py")


def _same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=atol, msg=key)


@pytest.fixture(scope="module")
def two_rank_training(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("mixed")
    launch(WORKER, str(out), "train")
    return torch.load(out / "result.pt", weights_only=True)


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
@pytest.mark.parametrize(("scenario", "composed"), [*((name, False) for name in SCENARIOS), ("text|text+image", True)])
def test_mixed_modality_ranks_train_like_one_process(
    two_rank_training: dict[str, Any], tmp_path: Path, scenario: str, composed: bool
) -> None:
    got = two_rank_training[f"{scenario}{' composed' if composed else ''}"]
    model, want = mixed_run(scenario, tmp_path, composed=composed)
    assert want.losses[0] != want.losses[-1]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want.losses), rtol=1e-5, atol=0)
    _same_weights(got["state"], model.state_dict())


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_rl_with_a_text_only_rank_and_an_image_rank_equals_one_process(tmp_path: Path) -> None:
    from _rl_helpers import tiny
    from _runs import rl_run

    from vl_rl.rollout import HFRolloutEngine

    launch(WORKER, str(tmp_path), "rl")
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    model, processor = tiny()
    engine = HFRolloutEngine(model, processor, max_new_tokens=4, thinking=False)
    for prompt, sequences in zip(mixed_prompts(), got["greedy"], strict=True):
        assert torch.equal(engine.generate([prompt], 1, greedy=True).sequences, sequences)
    model, want = rl_run(tmp_path / "one", core=True, prompts=mixed_prompts())
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want.losses), rtol=1e-5, atol=1e-7)
    # lr 1e-2 with AdamW: a near-zero gradient's rounding moves its weight by up to ~1e-3 of a step (3e-6 seen)
    _same_weights(got["state"], model.state_dict(), atol=1e-5)


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_distillation_with_a_text_only_rank_and_an_image_rank(tmp_path: Path) -> None:
    """Off-policy: one process's losses and weights, also for a composed student. On-policy (the ranks sample
    with synced_gpus): no hang."""
    launch(WORKER, str(tmp_path), "distill")
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    model, want = distill_run(tmp_path / "one", mode="off_policy")
    assert want.losses[0] != want.losses[-1]
    torch.testing.assert_close(torch.tensor(got["off_policy"]["losses"]), torch.tensor(want.losses), rtol=1e-5, atol=0)
    norms = torch.tensor([r["grad_norm"] for r in want.records])
    torch.testing.assert_close(torch.tensor(got["off_policy"]["norms"]), norms, rtol=1e-5, atol=0)
    _same_weights(got["off_policy"]["state"], model.state_dict(), atol=1e-5)
    twin = got["off_policy composed"]  # the composed twin of the student, sharded: the same losses and norms
    torch.testing.assert_close(torch.tensor(twin["losses"]), torch.tensor(want.losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(twin["norms"]), norms, rtol=1e-5, atol=0)
    on = got["on_policy"]
    assert on["steps"] == len(on["losses"]) == 2 and all(torch.isfinite(torch.tensor(on["losses"])))
    assert set(on["state"]) == set(model.state_dict())
