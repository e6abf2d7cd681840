"""One rank of the 2-process gloo test of the global loss normaliser (run as a script, not imported by pytest).

Usage: ``python _gloo_loss_worker.py RANK WORLD INIT_FILE OUT_FILE``. Each rank takes its rows of the
shared batch (``make_batch``), splits them into two micro-batches, computes the global normaliser
(summed over its micro-batches and all-reduced), back-propagates every micro-batch's ``lm_loss`` and
all-reduces (sums) the gradients; rank 0 saves them per reduction for the test to compare with one big batch.
"""

from __future__ import annotations

import os
import sys

import torch

ROWS, LENGTH, HIDDEN, VOCAB = 6, 9, 5, 11
REDUCTIONS = ("token", "sample", "sqrt")


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """The shared global batch: packed rows with ignored positions and a row without labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=gen)
    labels[torch.rand(ROWS, LENGTH, generator=gen) < 0.3] = -100
    labels[2] = -100
    segment_ids = torch.sort(torch.randint(0, 3, (ROWS, LENGTH), generator=gen), dim=1).values
    return {
        "hidden": torch.randn(ROWS, LENGTH, HIDDEN, generator=gen, dtype=torch.float64),
        "weight": torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64),
        "labels": labels,
        "segment_ids": segment_ids,
    }


def main(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    from vl_train.losses import global_loss_normalizer, lm_loss, loss_normalizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    batch = make_batch()
    per_rank = ROWS // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    micro = [(rows.start, rows.start + 1), (rows.start + 1, rows.stop)]
    results = {}
    for reduction in REDUCTIONS:
        hidden = batch["hidden"].clone().requires_grad_(True)
        weight = batch["weight"].clone().requires_grad_(True)
        parts = [(batch["labels"][a:b], batch["segment_ids"][a:b]) for a, b in micro]
        z = global_loss_normalizer([loss_normalizer(lab, seg, reduction) for lab, seg in parts])
        total = torch.zeros((), dtype=torch.float64)
        for (a, b), (lab, seg) in zip(micro, parts):
            out = lm_loss(hidden[a:b], weight, lab, segment_ids=seg, reduction=reduction, normalizer=z, chunk_size=4)
            out.loss.backward()
            total += out.loss.detach()
        grads = torch.cat([hidden.grad.reshape(-1), weight.grad.reshape(-1), total.reshape(1)])
        dist.all_reduce(grads)
        results[reduction] = grads
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    # gloo's threads can abort interpreter teardown ("terminate called without an active exception")
    # after the work and the process group are done: leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
