"""One rank of the 2-process FSDP2 test (run as a script under torchrun-style env, not imported by pytest's collection).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _fsdp_worker.py OUT_FILE``.
Every rank builds the same tiny ``VLForConditionalGeneration`` (same seed), shards it with
``vl_train.parallel.parallelize`` and trains it for ``STEPS`` AdamW steps on its half of each global
batch (4 text+image rows: rank ``r`` takes rows ``2r, 2r+1``) with the square-root loss and the
global normaliser. Rank 0 saves, per scenario, the per-step global losses and the gathered final
state dict; the test compares them with :func:`train` run in one process on the full batches.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vl_model"))

from _core_helpers import IMAGE, PATCH_DIM, VISION_END, VISION_START, hf_config_dict

ROWS, LENGTH, STEPS, LR = 4, 24, 3, 1e-3
# name -> (activation checkpointing, tied embeddings)
SCENARIOS = {"plain": (False, False), "checkpointed": (True, False), "tied": (False, True)}
# image grid (t, h, w) per row: 16 or 24 patches -> 4 or 6 merged tokens
GRIDS = ([1, 4, 4], [1, 4, 6], [1, 4, 6], [1, 4, 4])


def build_model(tie: bool = False, seed: int = 0) -> torch.nn.Module:
    """The tiny Qwen3-VL-layout model, identical for the same seed in every process."""
    from vl_model import VLConfig, VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = VLConfig.from_qwen3_vl(hf_config_dict() | {"model_type": "qwen3_vl", "tie_word_embeddings": tie})
    model = VLForConditionalGeneration(cfg).float()
    if tie:
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    return model.train()


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """``ROWS`` right-padded rows ``text, <vs>, image tokens, <ve>, text`` of different lengths."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.zeros(ROWS, LENGTH, dtype=torch.long)
    mask = torch.zeros(ROWS, LENGTH, dtype=torch.long)
    for r, grid in enumerate(GRIDS):
        n_img = grid[0] * grid[1] * grid[2] // 4
        head, tail = 2 + r, 9 - 2 * r + step
        row = (
            torch.randint(1, 240, (head,), generator=g).tolist()
            + [VISION_START]
            + [IMAGE] * n_img
            + [VISION_END]
            + torch.randint(1, 240, (tail,), generator=g).tolist()
        )
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    labels = torch.where(mask.bool() & (ids != IMAGE) & (ids != VISION_START), ids, torch.full_like(ids, -100))
    labels[:, :2] = -100  # an unlabelled prompt
    grid = torch.tensor(GRIDS)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMAGE).long(),
        "labels": labels,
        "pixel_values": torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g),
        "image_grid_thw": grid,
    }


def rows_of(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows ``start:stop`` of a global batch with their images' patches."""
    patches = batch["image_grid_thw"].prod(-1)
    first, last = int(patches[:start].sum()), int(patches[:stop].sum())
    out = {k: v[start:stop] for k, v in batch.items() if k != "pixel_values"}
    out["pixel_values"] = batch["pixel_values"][first:last]
    return out


def _step_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], z: torch.Tensor) -> Any:
    from vl_train.losses import lm_loss

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state
    # the target at position t is token t+1
    return lm_loss(
        hidden[:, :-1], model.lm_head.weight, batch["labels"][:, 1:], reduction="sqrt", normalizer=z, chunk_size=16
    )


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, gathered from its shards under FSDP (a collective there)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        out[name] = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
    return out


def train(
    model: torch.nn.Module, rows: tuple[int, int], world: int, first_grads: dict[str, torch.Tensor] | None = None
) -> list[float]:
    """``STEPS`` AdamW steps on rows ``rows`` of each global batch; the per-step global losses.

    ``first_grads`` (when given) receives the full gradients of the first step: AdamW alone is blind
    to a uniform gradient scale, so the test checks the loss scaling on these.
    """
    from vl_train.losses import global_loss_normalizer, loss_normalizer
    from vl_train.parallel import root_forward

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    losses = []
    for step in range(STEPS):
        batch = rows_of(global_batch(step), *rows)
        z = global_loss_normalizer([loss_normalizer(batch["labels"][:, 1:], None, "sqrt")])
        out = root_forward(model, _step_loss, model, batch, z)
        # FSDP averages gradients over ranks; the global normaliser wants them summed
        (out.loss * world).backward()
        if step == 0 and first_grads is not None:
            first_grads.update(full_grads(model))
        total = out.loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(total)
        losses.append(float(total))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def main(out_file: str) -> None:
    from torch.distributed.tensor import DTensor

    from vl_train.parallel import full_state_dict, init_distributed, is_main_process, parallelize, rank, world_size

    torch.set_num_threads(1)
    assert init_distributed("gloo")
    world, r = world_size(), rank()
    per_rank = ROWS // world
    results: dict[str, Any] = {}
    for name, (ckpt, tie) in SCENARIOS.items():
        model = parallelize(build_model(tie), activation_checkpointing=ckpt)
        grads: dict[str, torch.Tensor] = {}
        losses = train(model, (r * per_rank, (r + 1) * per_rank), world, grads)
        # every parameter is a DTensor shard, and a tied head still shares the embedding's parameter
        params = dict(model.named_parameters(remove_duplicate=False))
        sharded = all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in params.values())
        tied = params["lm_head.weight"] is params["model.language_model.embed_tokens.weight"]
        results[name] = {"losses": losses, "state": full_state_dict(model), "grads": grads, "sharded": sharded}
        results[name]["tied"] = tied
    if is_main_process():
        torch.save(results, out_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # gloo's threads can abort interpreter teardown ("terminate called without an active exception")
    # after the work and the process group are done: leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
