"""Packed multimodal rows and the runs the context-parallel tests compare (one process vs a dp x cp mesh).

Each micro-batch has 2 rows of 30 positions packing 5 samples: text, images and a video, with samples
cut by every CP part boundary (30 is no multiple of 4: the CP step pads the rows). One process trains on
both rows; with ``C`` ranks per CP group and ``W / C`` data-parallel groups, group ``d`` takes row ``d``
(all rows when there is one group) and each CP rank decodes its part of the row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from _trainer_helpers import IMAGE, PATCH_DIM, VIDEO, VISION_END, VISION_START

LENGTH, STEPS, ACCUM = 30, 2, 2
GRID = (1, 4, 4)  # 16 patches -> 4 merged tokens (an image, or a one-temporal-patch video)
# (kind, tokens) of the samples packed in each row
ROWS = ((("image", 12), ("text", 10), ("video", 8)), (("image", 16), ("text", 14)))


def _sample(gen: torch.Generator, kind: str, length: int) -> dict[str, Any]:
    ids = torch.randint(0, 250, (length,), generator=gen)
    pixels = None
    if kind != "text":
        ids[1], ids[2:6], ids[6] = VISION_START, IMAGE if kind == "image" else VIDEO, VISION_END
        pixels = torch.randn(16, PATCH_DIM, generator=gen)
    labels = ids.clone()
    labels[: length // 2] = -100
    return {"ids": ids, "labels": labels, "kind": kind, "pixels": pixels}


def packed_batch(seed: int, rows: tuple[int, ...] = (0, 1)) -> dict[str, torch.Tensor]:
    """The micro-batch ``seed`` (its rows ``rows``): packed samples with ``segment_ids``."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("input_ids", "labels", "segment_ids")}
    pixels: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
    for r in rows:
        gen = torch.Generator().manual_seed(100 * seed + r)
        samples = [_sample(gen, kind, n) for kind, n in ROWS[r]]
        out["input_ids"].append(torch.cat([s["ids"] for s in samples]))
        out["labels"].append(torch.cat([s["labels"] for s in samples]))
        out["segment_ids"].append(torch.cat([torch.full((len(s["ids"]),), j) for j, s in enumerate(samples)]))
        for s in samples:
            if s["pixels"] is not None:
                pixels[s["kind"]].append(s["pixels"])
    batch = {k: torch.stack(v) for k, v in out.items()}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    for kind, key, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if pixels[kind]:
            batch[key] = torch.cat(pixels[kind])
            batch[grid] = torch.tensor([GRID] * len(pixels[kind]))
    return batch


def cp_run(
    out: Path,
    context_parallel: int = 1,
    *,
    moe: bool = False,
    expert_parallel: int = 1,
    activation_checkpointing: bool = False,
) -> tuple[Any, Any]:
    """``(model, result)`` of ``STEPS`` steps; under torchrun this rank's data-parallel group takes its rows.

    ``moe``: the tiny MoE model (4 experts, top-2, global-batch balance loss); ``expert_parallel``: its
    experts sharded over that many ranks; ``activation_checkpointing``: recompute every block in backward.
    """
    from _trainer_helpers import quiet, tiny_model

    from vl_train import TrainConfig, Trainer
    from vl_train.context_parallel import data_parallel_rank, data_parallel_size

    groups = data_parallel_size(context_parallel)
    rows = (0, 1) if groups == 1 else (data_parallel_rank(context_parallel),)
    batches = [packed_batch(i, rows) for i in range(STEPS * ACCUM)]
    model = tiny_model(0, moe=moe, aux_coef=0.5 if moe else 0.0)
    cfg = TrainConfig(
        **quiet(
            max_steps=STEPS,
            grad_accum_steps=ACCUM,
            context_parallel=context_parallel,
            expert_parallel=expert_parallel,
            activation_checkpointing=activation_checkpointing,
            loss_reduction="sqrt",
            loss_chunk_size=8,
            output_dir=str(out),
        )
    )
    return model, Trainer(model, cfg, iter(batches)).train()
