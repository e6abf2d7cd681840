"""One rank of the 2-process composed-model runs (a script, not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _composed_worker.py OUT KIND``, KIND
``train`` (the supervised ``Trainer`` on the composed twin of the tiny core model, rank ``r`` taking its rows of
every global micro-batch) or ``rl`` (``RLTrainer`` on the composed twin, each rank updating on its groups of a
fixed rollout). Rank 0 writes ``OUT/result.pt``: the per-step losses and the gathered final weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def main(out: str, kind: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vl_train"))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vl_rl"))
    from _runs import rl_run, train_run

    from vl_train.parallel import full_state_dict, init_distributed, is_main_process, rank, world_size

    torch.set_num_threads(1)
    assert init_distributed("gloo")
    run = train_run if kind == "train" else rl_run
    model, result = run(Path(out) / "run", rank(), world_size())
    state = full_state_dict(model)
    if is_main_process():
        torch.save({"losses": result.losses, "state": state}, Path(out) / "result.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
