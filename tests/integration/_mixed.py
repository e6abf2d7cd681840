"""Micro-batches whose rows hold text only, an image, a video or both, and the mixed-modality runs the tests compare.

Each scenario lists, per micro-step, the row kinds of rank 0 and of rank 1. One process trains on the
two ranks' rows of every micro-step concatenated (rank 0's first); two FSDP2 ranks each train on their
own rows. Equal losses and weights mean the ranks' mixed modalities gave one process's gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _trainer_helpers import IMAGE, PATCH_DIM, VIDEO, VISION_END, VISION_START

LENGTH, STEPS = 24, 2
GRID = (1, 4, 4)  # 16 patches -> 4 merged tokens, for an image and for a one-temporal-patch video
PATCHES = GRID[0] * GRID[1] * GRID[2]

SCENARIOS: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "text|image": [(("text", "text"), ("image", "image"))],
    "image|video": [(("image", "image"), ("video", "video"))],
    # rank 0 text-only throughout; rank 1 text in one micro-step and images (and a video) in the other
    "text|text+image": [(("text", "text"), ("text", "text")), (("text", "text"), ("image", "both"))],
}


def _row(gen: torch.Generator, kind: str) -> dict[str, torch.Tensor]:
    """One row: a prompt (with an image at 1..6 and/or a video at 7..12) and a labelled answer."""
    ids = torch.randint(0, 250, (LENGTH,), generator=gen)
    out: dict[str, torch.Tensor] = {}
    if kind in ("image", "both"):
        ids[1], ids[2:6], ids[6] = VISION_START, IMAGE, VISION_END
        out["pixel_values"] = torch.randn(PATCHES, PATCH_DIM, generator=gen)
        out["image_grid_thw"] = torch.tensor([GRID])
    if kind in ("video", "both"):
        ids[7], ids[8:12], ids[12] = VISION_START, VIDEO, VISION_END
        out["pixel_values_videos"] = torch.randn(PATCHES, PATCH_DIM, generator=gen)
        out["video_grid_thw"] = torch.tensor([GRID])
    labels = ids.clone()
    labels[: LENGTH // 2 + 1] = -100
    out.update(input_ids=ids[None], labels=labels[None], attention_mask=torch.ones(1, LENGTH, dtype=torch.long))
    return out


def join(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows as one batch (pixel keys only when some row has them)."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: torch.cat([r[k] for r in rows if k in r]) for k in keys}


def rank_batches(scenario: str, rank: int | None) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of ``STEPS`` steps for ``rank`` (``None``: both ranks' rows together, one process)."""
    out = []
    for step in range(STEPS):
        for micro, kinds in enumerate(SCENARIOS[scenario]):
            rows = []
            for r in (0, 1):
                gen = torch.Generator().manual_seed(1000 * step + 100 * micro + 10 * r)
                rows += [_row(gen, kind) for kind in kinds[r]] if rank in (None, r) else []
            out.append(join(rows))
    return out


def _settings(scenario: str, out: Path, **overrides: Any) -> dict[str, Any]:
    """The runs' ``TrainConfig`` keywords: ``STEPS`` steps of the scenario's micro-steps, quiet."""
    from _trainer_helpers import quiet

    return quiet(
        max_steps=STEPS, grad_accum_steps=len(SCENARIOS[scenario]), loss_chunk_size=8, output_dir=str(out), **overrides
    )


def mixed_run(scenario: str, out: Path, rank: int | None = None, *, composed: bool = False) -> tuple[Any, Any]:
    """``(model, result)`` of ``STEPS`` supervised steps on ``scenario``'s batches for ``rank`` (None: one process)."""
    from _composed import composed_twin
    from _trainer_helpers import tiny_model

    from vl_train import TrainConfig, Trainer

    model = tiny_model(0)
    if composed:
        model = composed_twin(model)
    cfg = TrainConfig(**_settings(scenario, out, loss_reduction="sqrt"))
    return model, Trainer(model, cfg, iter(rank_batches(scenario, rank))).train()


def distill_run(
    out: Path, rank: int | None = None, *, mode: str = "off_policy", composed: bool = False
) -> tuple[Any, Any]:
    """``(student, result)`` of ``STEPS`` distillation steps on the ``"text|text+image"`` rows for ``rank``.

    Off-policy: forward KL to a frozen teacher on the rows' labelled answers. On-policy: reverse KL on 3
    tokens the student samples after each row's prompt (its first 13 positions, holding the image or video).
    ``composed``: the student is the core model's composed twin (the same network).
    """
    from _composed import composed_twin
    from _trainer_helpers import tiny_model

    from vl_train import Distill
    from vl_train.distill_run import DistillTrainer

    scenario = "text|text+image"
    batches = rank_batches(scenario, rank)
    if mode == "on_policy":
        keep = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
        batches = [
            {"input_ids": b["input_ids"][:, :13], "attention_mask": b["attention_mask"][:, :13]}
            | {k: b[k] for k in keep if k in b}
            for b in batches
        ]
    loss = "forward_kl" if mode == "off_policy" else "reverse_kl"
    cfg = Distill(mode, loss, max_new_tokens=3, **_settings(scenario, out, loss_reduction="token"))  # type: ignore[arg-type]
    student, teacher = tiny_model(0), tiny_model(1).eval()
    if composed:
        student = composed_twin(student)
    torch.manual_seed(123)
    return student, DistillTrainer(student, teacher, cfg, iter(batches)).train()


def text_only(sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` with its images dropped (the question kept)."""
    messages = []
    for message in sample["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = [part for part in content if part.get("type") == "text"]
        messages.append({**message, "content": content})
    return {**sample, "messages": messages}


def mixed_prompts() -> list[dict[str, Any]]:
    """Two prompts: a text-only one, then one with an image."""
    from _rl_helpers import samples

    first, second = samples(2)
    return [text_only(first), second]
