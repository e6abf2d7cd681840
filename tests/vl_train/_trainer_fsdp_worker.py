"""One rank of the 2-process FSDP2 ``Trainer`` test (run as a script, not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _trainer_fsdp_worker.py OUT_DIR``.
Every rank builds the same tiny model (same seed); the ``Trainer`` shards it itself and trains
``STEPS`` steps of ``ACCUM`` micro-batches, rank ``r`` taking rows ``r*ROWS/W .. (r+1)*ROWS/W`` of each
global micro-batch. Rank 0 writes the metrics and the checkpoint under ``OUT_DIR/run`` and the
per-step losses to ``OUT_DIR/losses.pt``; the test compares them with one process on full batches.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from _trainer_helpers import SyntheticBatches, tiny_model

from vl_train.config import TrainConfig

ROWS, LENGTH, STEPS, ACCUM = 4, 16, 3, 2


def config(output_dir: Path) -> TrainConfig:
    """The run's settings (shared with the single-process reference)."""
    return TrainConfig(
        max_steps=STEPS,
        grad_accum_steps=ACCUM,
        micro_batch_size=ROWS,
        lr=1e-3,
        weight_decay=0.01,
        loss_reduction="sqrt",
        loss_chunk_size=8,
        output_dir=str(output_dir),
        plot=False,
    )


def batches(start: int = 0, stop: int = ROWS) -> Iterator[dict[str, torch.Tensor]]:
    """Rows ``start:stop`` of every global micro-batch (each row has one 16-patch image)."""
    source = SyntheticBatches(seed=3, rows=ROWS, length=LENGTH)
    per_row = 16
    while True:
        batch = next(source)
        out = {k: v[start:stop] for k, v in batch.items() if k != "pixel_values"}
        out["pixel_values"] = batch["pixel_values"][start * per_row : stop * per_row]
        yield out


def main(out_dir: str) -> None:
    from vl_train.parallel import init_distributed, is_main_process, rank, world_size
    from vl_train.trainer import Trainer

    torch.set_num_threads(1)
    assert init_distributed("gloo")
    per_rank = ROWS // world_size()
    r = rank()
    trainer = Trainer(tiny_model(), config(Path(out_dir) / "run"), batches(r * per_rank, (r + 1) * per_rank))
    result = trainer.train()
    if is_main_process():
        torch.save({"losses": result.losses, "checkpoint": str(result.checkpoint)}, Path(out_dir) / "losses.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(sys.argv[1])
