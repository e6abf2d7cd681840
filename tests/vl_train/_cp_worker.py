"""One rank of the context-parallel runs (a script, not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=W MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _cp_worker.py OUT RUN [RUN ...]``, each
RUN ``C`` (a ``Trainer`` run of the dense model on the ``(W / C, C)`` mesh, ``_cp.cp_run``) or ``moe:C:P`` (the MoE
model with CP size ``C`` and its experts sharded over ``P`` ranks), optionally followed by ``+ckpt``
(activation checkpointing). Rank 0 writes ``OUT/result.pt``: per RUN,
the losses, gradient norms, MoE balance losses, gathered final weights and the positions a rank decodes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch


def _part_length(model: Any) -> int:
    """Positions of the hidden states a rank's forward returns for one 30-position row (padded to 32 for C = 4)."""
    from _cp import packed_batch

    from vl_train.parallel import root_forward
    from vl_train.step import MODEL_INPUTS

    batch = packed_batch(0, (0,))
    context = model.__dict__.get("_vl_train_context_parallel")
    if context is not None:
        batch, _ = context.pad(batch, batch["input_ids"])
    with torch.no_grad():
        hidden = root_forward(model, lambda: model.forward_hidden(**{k: batch[k] for k in MODEL_INPUTS if k in batch}))
    return int(hidden.last_hidden_state.shape[1])


def _runs(out: str, runs: list[str]) -> dict[str, Any]:
    from _cp import cp_run

    from vl_train.parallel import full_state_dict

    result: dict[str, Any] = {}
    for name in runs:
        spec, _, flag = name.partition("+")
        moe = spec.startswith("moe:")
        size, experts = (int(x) for x in spec.split(":")[1:]) if moe else (int(spec), 1)
        model, run = cp_run(
            Path(out) / name.replace(":", "_").replace("+", "_"),
            size,
            moe=moe,
            expert_parallel=experts,
            activation_checkpointing=flag == "ckpt",
        )
        result[name] = {
            "losses": run.losses,
            "grad_norms": [r["grad_norm"] for r in run.records],
            "aux": [r.get("moe_aux_loss") for r in run.records],
            "state": full_state_dict(model),
            "part_length": _part_length(model),
        }
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _launch import serve_rank

    serve_rank(sys.argv[1], lambda: _runs(sys.argv[1], sys.argv[2:]))
