"""Dynamic sampling on a sharded model: every rank runs as many generation rounds, however its groups turn out.

Generating with an FSDP-sharded model is a collective. When one rank's first round already fills its share
and another rank's holds only equal rewards, the second rank's extra round must be matched by the first:
otherwise gloo fails on mismatched collectives and NCCL hangs. Both ranks must make the same generate calls
(the same number of groups each) and finish the step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _launch import GLOO, launch

WORKER = Path(__file__).with_name("_dynamic_worker.py")


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_ranks_sample_the_same_rounds_when_only_one_needs_more(tmp_path: Path) -> None:
    launch(WORKER, str(tmp_path), timeout=180.0)
    got = torch.load(tmp_path / "result.pt", weights_only=False)
    assert got["calls"] == [[1, 1], [1, 1]], got["calls"]  # rank 0 full after round 1 still takes part in round 2
    assert got["steps"] == 1
    record = got["records"][0]
    assert record["sample_rounds"] == 2 and record["groups_generated"] == 2
