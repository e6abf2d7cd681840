"""Expert parallelism: experts sharded over 2 gloo ranks, tokens dispatched and combined by all-to-all.

Each rank's outputs and input gradients must equal one process's on the same tokens, and the sharded
experts' gradients (every rank's tokens' contributions) must equal the one-process gradients of all
tokens, also when one rank's experts receive no token.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _ep_data import block, cotangent, one_sided, tokens

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vl_train"))
from _launch import GLOO, launch

WORKER = Path(__file__).with_name("_ep_worker.py")


@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable")
def test_expert_parallel_block_equals_one_process(tmp_path: Path) -> None:
    launch(WORKER, str(tmp_path), world=2, timeout=120)
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for name, make in (("mixed", block), ("one_sided", one_sided)):
        moe = make()
        xs = [tokens(r, positive=name == "one_sided").requires_grad_() for r in range(2)]
        ys = [moe(x) for x in xs]
        sum((y * cotangent(y)).sum() for y in ys).backward()
        for r in range(2):
            torch.testing.assert_close(got[r][name]["y"], ys[r], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[r][name]["x_grad"], xs[r].grad, rtol=1e-5, atol=1e-6)
        gate = got[0][name]["gate_grad"] + got[1][name]["gate_grad"]  # the router is replicated: ranks' sum
        torch.testing.assert_close(gate, moe.gate.weight.grad, rtol=1e-5, atol=1e-6)
        for key, param in (("gate_up_grad", moe.experts.gate_up_proj), ("down_grad", moe.experts.down_proj)):
            assert param.grad is not None
            for r in range(2):
                torch.testing.assert_close(got[r][name][key], param.grad, rtol=1e-5, atol=1e-6)
    assert got[1]["one_sided"]["received"] == 0  # rank 1's experts computed nothing, yet every rank finished
