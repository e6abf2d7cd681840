"""One rank of the expert-parallel block test (a script): ``python _ep_worker.py OUT`` under RANK/WORLD_SIZE/MASTER_*.

Every rank builds the same ``SparseMoeBlock``, shards its experts over the 2 ranks and runs its own tokens
(``_ep_data.tokens(rank)``) forward and backward; rank r writes ``OUT/r.pt`` (outputs, gradients). A second
pass with a router that sends every token to rank 0's experts leaves rank 1 nothing to compute.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _ep_data import block, cotangent, one_sided, tokens
    from torch.distributed.device_mesh import init_device_mesh

    from vl_moe import ExpertParallelExperts, shard_experts

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result = {}
    for name, make in (("mixed", block), ("one_sided", one_sided)):
        moe = make()
        assert shard_experts(moe, mesh, gradient_divide_factor=1.0) == [""]
        assert isinstance(moe.experts, ExpertParallelExperts) and moe.experts.gate_up_proj.to_local().shape[0] == 2
        x = tokens(rank, positive=name == "one_sided").requires_grad_()
        y = moe(x)
        (y * cotangent(y)).sum().backward()
        result[name] = {
            "y": y.detach(),
            "x_grad": x.grad,
            "gate_grad": moe.gate.weight.grad,
            "gate_up_grad": moe.experts.gate_up_proj.grad.full_tensor(),
            "down_grad": moe.experts.down_proj.grad.full_tensor(),
            "received": int(moe.experts.gate_up_proj.grad.to_local().abs().sum() > 0),
        }
    torch.save(result, Path(out) / f"{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)
