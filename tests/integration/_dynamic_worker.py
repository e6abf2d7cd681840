"""One rank of the 2-process dynamic-sampling run (a script, not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _dynamic_worker.py OUT``. Both ranks
train one DAPO step with dynamic sampling on a sharded model; rank 1's first round has only equal rewards, so
it needs a second round that rank 0 does not. The engine makes one collective per call, as generating with
a sharded model does. Rank 0 writes ``OUT/result.pt``: every rank's generate calls and the run's steps.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch


class CollectiveEngine:
    """Answers every prompt with the fixed rollout's group; rank 1's first answers are all alike."""

    def __init__(self, rollout: Any, pad_id: int) -> None:
        self.rollout, self.pad_id, self.calls = rollout, pad_id, []  # type: list[int]

    def generate(self, samples: Any, group_size: int, *, greedy: bool = False) -> Any:
        from vl_rl.rollout import concat_rollouts

        torch.distributed.all_reduce(torch.zeros(1))  # a sharded model's forward passes are collectives
        self.calls.append(len(samples))
        out = concat_rollouts([self.rollout] * len(samples), self.pad_id)
        if torch.distributed.get_rank() == 1 and len(self.calls) == 1:
            out = dataclasses.replace(out, texts=["same"] * len(out.texts))  # equal rewards: no signal
        return out


def _run(out: Path) -> dict[str, Any]:
    from _rl_helpers import samples, tiny
    from _runs import length_reward

    from vl_rl.config import RLConfig
    from vl_rl.rollout import HFRolloutEngine
    from vl_rl.trainer import RLTrainer

    model, processor = tiny()
    prompts = samples(2)
    torch.manual_seed(0)
    fixed = HFRolloutEngine(model, processor, max_new_tokens=4, thinking=False).generate(prompts[:1], 3)
    engine = CollectiveEngine(fixed, processor.tokenizer.pad_token_id)
    cfg = RLConfig(
        group_size=3,
        prompts_per_step=2,
        dynamic_sampling=True,
        max_sample_rounds=4,
        max_new_tokens=4,
        thinking=False,
        max_steps=1,
        eval_every=0,
        output_dir=str(out),
        progress=False,
        plot=False,
    )
    result = RLTrainer(model, processor, cfg, prompts, length_reward, engine=engine).train()
    calls: list[Any] = [None, None]
    torch.distributed.all_gather_object(calls, engine.calls)
    return {"calls": calls, "steps": result.steps, "records": result.records}


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for folder in (here, here.parent / "vl_train", here.parent / "vl_rl"):
        sys.path.insert(0, str(folder))
    from _launch import serve_rank

    serve_rank(sys.argv[1], lambda: _run(Path(sys.argv[1])))
