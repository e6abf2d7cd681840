"""One rank of the 2-process mixed-modality runs (a script, not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _mixed_worker.py OUT KIND``, KIND
``train`` (every scenario of ``_mixed.SCENARIOS`` through the ``Trainer`` on the core model, then the last one
on the composed twin) or ``rl`` (greedy generation of rank r's prompt, text-only on rank 0 and with an image on
rank 1, by the sharded model; then ``RLTrainer`` on a fixed rollout of those prompts) or ``distill``
(``DistillTrainer`` off- and on-policy on a text-only rank 0 and a rank 1 with images). Rank 0 writes
``OUT/result.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch


def _train(out: Path) -> dict[str, Any]:
    from _mixed import SCENARIOS, mixed_run

    from vl_train.parallel import full_state_dict, rank

    result: dict[str, Any] = {}
    runs = [(name, False) for name in SCENARIOS] + [("text|text+image", True)]
    for name, composed in runs:
        model, run = mixed_run(name, out / f"{name}-{composed}".replace("|", "_"), rank(), composed=composed)
        result[f"{name}{' composed' if composed else ''}"] = {"losses": run.losses, "state": full_state_dict(model)}
    return result


def _rl(out: Path) -> dict[str, Any]:
    from _mixed import mixed_prompts
    from _runs import rl_run

    from vl_rl.rollout import HFRolloutEngine
    from vl_train.parallel import full_state_dict, parallelize, rank

    generated: list[torch.Tensor] = []

    def prepare(model: Any, processor: Any) -> None:
        parallelize(model)
        engine = HFRolloutEngine(model, processor, max_new_tokens=4, thinking=False)
        generated.append(engine.generate([mixed_prompts()[rank()]], 1, greedy=True).sequences)
        model.reshard()  # the root keeps its gathered parameters after a forward: the optimiser wants the shards

    model, run = rl_run(out / "rl", rank(), 2, core=True, prompts=mixed_prompts(), prepare=prepare)
    sequences: list[Any] = [None, None]
    torch.distributed.all_gather_object(sequences, generated[0])
    return {"losses": run.losses, "state": full_state_dict(model), "greedy": sequences}


def _distill(out: Path) -> dict[str, Any]:
    from _mixed import distill_run

    from vl_train.parallel import full_state_dict, rank

    result: dict[str, Any] = {}
    for mode, composed in (("off_policy", False), ("on_policy", False), ("off_policy", True)):
        model, run = distill_run(out / f"{mode}-{composed}", rank(), mode=mode, composed=composed)
        norms = [r["grad_norm"] for r in run.records]
        record = {"losses": run.losses, "norms": norms, "steps": run.steps, "state": full_state_dict(model)}
        result[f"{mode}{' composed' if composed else ''}"] = record
    return result


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for folder in (here, here.parent / "vl_train", here.parent / "vl_rl"):
        sys.path.insert(0, str(folder))
    from _launch import serve_rank

    work = {"train": _train, "rl": _rl, "distill": _distill}[sys.argv[2]]
    serve_rank(sys.argv[1], lambda: work(Path(sys.argv[1])))
