"""Run a tiny training in its own process for the kill-and-resume test.

Usage: ``python _resume_worker.py OUTPUT_DIR MAX_STEPS KILL_AFTER RESUME``. With ``KILL_AFTER > 0`` the
process SIGKILLs itself right after the checkpoint of that step is written (no cleanup runs, as in a
crash); with ``RESUME=1`` it continues from the latest checkpoint in ``OUTPUT_DIR``. A run that ends
normally writes its per-step losses to ``OUTPUT_DIR/losses.json`` (``repr`` of each float: exact).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from _trainer_helpers import SyntheticBatches, quiet, tiny_model

from vl_train.config import TrainConfig
from vl_train.trainer import Trainer


def main() -> None:
    output_dir, max_steps, kill_after, resume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    torch.set_num_threads(1)  # identical kernels (and reduction orders) in every process

    def kill(trainer: Trainer, record: dict[str, Any]) -> None:
        if record["step"] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig(**quiet(max_steps=max_steps, lr=2e-3, warmup_steps=2, save_every=1, output_dir=output_dir))
    trainer = Trainer(
        tiny_model(), cfg, SyntheticBatches(seed=7), callbacks=[kill] if kill_after else (), resume=resume
    )
    result = trainer.train()
    Path(output_dir, "losses.json").write_text(json.dumps([repr(x) for x in result.losses]))


if __name__ == "__main__":
    main()
