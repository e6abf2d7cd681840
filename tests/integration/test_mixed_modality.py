"""Ranks holding different modalities (text only, images, videos, both) train like one process on all rows.

Without one tower pass per forward on every rank (a zero-weighted placeholder where a rank has no
pixels), the sharded tower's collectives do not match: gloo raises "Received data size doesn't match",
NCCL hangs. Two FSDP2 gloo ranks must give the losses and weights of one process on the concatenated
rows, for the supervised ``Trainer`` (core and composed models) and the ``RLTrainer``, and greedy
generation by the sharded model must give one process's tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _launch import GLOO, launch
from _mixed import SCENARIOS, mixed_prompts, mixed_run

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
