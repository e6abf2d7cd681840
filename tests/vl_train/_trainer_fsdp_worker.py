"""One rank of the 2-process FSDP2 ``Trainer`` test (run as a script, not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _trainer_fsdp_worker.py OUT_DIR [STOP RESUME]``.
Every rank builds the same tiny model (same seed); the ``Trainer`` shards it itself and trains
``STEPS`` steps of ``ACCUM`` micro-batches, rank ``r`` taking rows ``r*ROWS/W .. (r+1)*ROWS/W`` of each
global micro-batch. Rank 0 writes the metrics and the checkpoint under ``OUT_DIR/run`` and the
per-step losses to ``OUT_DIR/losses.pt``; the test compares them with one process on full batches.
With ``STOP > 0`` every rank stops after step ``STOP`` (a callback; the trainer checkpoints); with
``RESUME=1`` the ranks continue from the latest checkpoint in ``OUT_DIR/run``. With ``VL_TEST_MOE=1`` the model
is the tiny MoE one with the global-batch balance loss; ``VL_TEST_CHECKPOINT_FORMAT=sharded`` writes sharded
(``torch.distributed.checkpoint``) checkpoints.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from _trainer_helpers import SyntheticBatches, tiny_model

from vl_train.config import OptimConfig, TrainConfig

ROWS, LENGTH, STEPS, ACCUM = 4, 16, 3, 2


def config(output_dir: Path, moe: bool = False) -> TrainConfig:
    """The run's settings (shared with the single-process reference)."""
    return TrainConfig(
        global_batch_balance=True,
        max_steps=STEPS,
        grad_accum_steps=ACCUM,
        micro_batch_size=ROWS,
        optim=OptimConfig(lr=1e-3, weight_decay=0.01),
        loss_reduction="sqrt",
        loss_chunk_size=8,
        output_dir=str(output_dir),
        plot=False,
        checkpoint_format=os.environ.get("VL_TEST_CHECKPOINT_FORMAT", "full"),  # type: ignore[arg-type]
    )


class RankRows(Iterator[dict[str, torch.Tensor]]):
    """Rows ``start:stop`` of every global micro-batch (each row has one 16-patch image); checkpointable."""

    def __init__(self, start: int, stop: int) -> None:
        self.source, self.start, self.stop = SyntheticBatches(seed=3, rows=ROWS, length=LENGTH), start, stop

    def __next__(self) -> dict[str, torch.Tensor]:
        batch, per_row = next(self.source), 16
        out = {k: v[self.start : self.stop] for k, v in batch.items() if k != "pixel_values"}
        out["pixel_values"] = batch["pixel_values"][self.start * per_row : self.stop * per_row]
        return out

    def state_dict(self) -> dict[str, int]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.source.load_state_dict(state)


def batches(start: int = 0, stop: int = ROWS) -> RankRows:
    """Rows ``start:stop`` of every global micro-batch."""
    return RankRows(start, stop)


def main(out_dir: str, stop: int = 0, resume: bool = False) -> None:
    from vl_train.parallel import init_distributed, is_main_process, rank, world_size
    from vl_train.trainer import Trainer

    torch.set_num_threads(1)
    assert init_distributed("gloo")
    per_rank = ROWS // world_size()
    r = rank()
    moe = os.environ.get("VL_TEST_MOE") == "1"
    trainer = Trainer(
        tiny_model(moe=moe, aux_coef=0.5 if moe else 0.0),
        config(Path(out_dir) / "run", moe),
        batches(r * per_rank, (r + 1) * per_rank),
        callbacks=[lambda t, record: record["step"] == stop],
        resume=resume,
    )
    result = trainer.train()
    name = "stopped.pt" if stop else "losses.pt"
    if is_main_process():
        aux = [r.get("moe_aux_loss") for r in result.records]
        torch.save({"losses": result.losses, "aux": aux, "checkpoint": str(result.checkpoint)}, Path(out_dir) / name)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args = [*sys.argv[1:], "0", "0"]
    main(args[0], int(args[1]), args[2] == "1")
    # gloo's threads can abort interpreter teardown ("terminate called without an active exception")
    # after the work and the process group are done: leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
