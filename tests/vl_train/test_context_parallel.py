"""Context parallelism (Ulysses over a CP group, the tower data-parallel across it, FSDP2 on a dp x cp mesh).

Packed multimodal rows (images, a video, text; samples cut by the CP part boundaries; a row length that
4 does not divide) must train on ``C`` = 2 and 4 ranks per row, and on a 2 x 2 (dp x cp) mesh, exactly as
one process trains on the whole rows: the same losses, gradient norms and weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _cp import LENGTH, cp_run
from _launch import GLOO, launch

WORKER = Path(__file__).with_name("_cp_worker.py")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Any]:
    model, result = cp_run(tmp_path_factory.mktemp("one"))
    assert result.losses[0] != result.losses[-1]
    return model.state_dict(), result


def _check(got: dict[str, Any], want: tuple[dict[str, torch.Tensor], Any]) -> None:
    state, result = want
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(result.losses), rtol=1e-5, atol=0)
    norms = [r["grad_norm"] for r in result.records]
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(norms), rtol=1e-5, atol=0)
    assert set(got["state"]) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(got["state"][key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_two_cp_ranks_train_a_packed_multimodal_row_like_one_process(tmp_path: Path, one_process: Any) -> None:
    launch(WORKER, str(tmp_path), "2", world=2)
    got = torch.load(tmp_path / "result.pt", weights_only=True)["2"]
    assert got["part_length"] == LENGTH // 2  # each rank decodes half of the row
    _check(got, one_process)


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_four_ranks_cp4_and_dp2_x_cp2_train_like_one_process(tmp_path: Path, one_process: Any) -> None:
    launch(WORKER, str(tmp_path), "4", "2", world=4)
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    assert got["4"]["part_length"] == 8  # 30 positions padded to 32, a quarter each
    assert got["2"]["part_length"] == LENGTH // 2
    _check(got["4"], one_process)
    _check(got["2"], one_process)
