"""One rank of the global-batch balancing test: ``python _gloo_worker.py RANK WORLD INIT_FILE OUT_DIR``.

Run as a script (not pickled by ``multiprocessing``), so it works wherever the test files are.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from vl_moe import MoEBalanceTracker, route

EXPERTS, TOP_K = 6, 2


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[6 + 3 rank, E]`` of one rank and their top-k ids."""
    gen = torch.Generator().manual_seed(10 + rank)
    logits = torch.randn(6 + 3 * rank, EXPERTS, generator=gen) * 2
    return logits, route(logits, TOP_K)[1]


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        logits, ids = batch(rank)
        tracker = MoEBalanceTracker(EXPERTS, TOP_K, num_layers=2)
        tracker.add(ids, layer=1)
        tracker.add(ids.flip(0), layer=0)
        counts, tokens = tracker.global_counts(layer=1)
        torch.save({"counts": counts, "tokens": tokens, "loss": tracker.loss(logits, layer=1)}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
