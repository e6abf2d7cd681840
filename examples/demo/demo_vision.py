"""V0: the demo's vision tower pretrained alone, standing in for the SigLIP-2 checkpoint Qwen3-VL starts from.

Qwen3-VL never trains its vision encoder from scratch: the tower starts from SigLIP-2, whose training
adds location-aware decoder losses (grounded captions, referring expressions) so that each patch
feature says what is there. The demo's tower is random, and through the language model alone it learns
colours at once but shape kinds too weakly for the LLM to pick "the star" out of several shapes (see
the README's probe section). So before S0 the tower and merger are trained alone, with two linear heads
that are thrown away afterwards: every merged visual token (one ``grid``-px cell of a training scene)
names the kind and the colour of the shape in its cell, or "empty".

The scenes are drawn like the synthetic dataset's (``vl_train.data._shapes.Scene`` with the demo's
canvas sizes and grid), from their own random stream, never from the held-out split.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vl_train.data._shapes import COLOURS, KINDS, Scene

__all__ = ["TowerSpec", "cell_labels", "pretrain_tower"]

_COLOURS = tuple(COLOURS)
EMPTY_KIND, EMPTY_COLOUR = len(KINDS), len(_COLOURS)
"""The "empty cell" class of each head (after the kinds and the colours)."""


@dataclass
class TowerSpec:
    """Settings of V0.

    Attributes:
        steps: Optimiser steps (0 skips V0).
        lr: Learning rate of the tower, merger and heads (AdamW, constant).
        scenes_per_step: Training scenes per step.
        max_shapes: Each scene holds 1 to ``max_shapes`` shapes.
    """

    steps: int = 1000
    lr: float = 1e-3
    scenes_per_step: int = 16
    max_shapes: int = 8


def cell_labels(scene: Scene, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kinds, colours)``: one class per ``grid``-px cell, row-major (the merged tokens' order).

    Raises:
        ValueError: ``grid`` < 1, a canvas side that is not a multiple of it, or a shape not inside one cell.
    """
    if grid < 1 or scene.width % grid or scene.height % grid:
        raise ValueError(
            f"V0 needs canvas sides that are multiples of the grid, got {scene.width}x{scene.height}, {grid}"
        )
    columns = scene.width // grid
    kinds = torch.full((scene.height // grid * columns,), EMPTY_KIND)
    colours = torch.full_like(kinds, EMPTY_COLOUR)
    for shape in scene.shapes:
        column, row = shape.x // grid, shape.y // grid
        if (shape.x + shape.size - 1) // grid != column or (shape.y + shape.size - 1) // grid != row:
            raise ValueError(
                f"shape {shape.label} at ({shape.x}, {shape.y}) size {shape.size} straddles {grid} px cells"
            )
        kinds[row * columns + column] = KINDS.index(shape.kind)
        colours[row * columns + column] = _COLOURS.index(shape.colour)
    return kinds, colours


def _scene(rng: np.random.Generator, settings: Any, spec: TowerSpec) -> Scene:
    scene = Scene.random(rng, tuple(settings.image_size_range), settings.grid)
    count = int(rng.integers(1, spec.max_shapes + 1))
    scene.fill(
        rng, [(KINDS[int(rng.integers(len(KINDS)))], _COLOURS[int(rng.integers(len(_COLOURS)))]) for _ in range(count)]
    )
    return scene


def pretrain_tower(
    model: Any, processor: Any, settings: Any, spec: TowerSpec, output_dir: Path, *, progress: bool = True
) -> tuple[float, list[float]]:
    """Train ``model``'s tower and merger in place on cell labels; returns ``(seconds, loss per step)``.

    Writes ``metrics.jsonl`` (step, loss, kind and colour accuracy on the step's occupied cells) to
    ``output_dir``.

    Raises:
        ValueError: ``settings.grid`` is 0 (free placement has no cells to label).
    """
    if settings.grid <= 0:
        raise ValueError("V0 labels one shape per grid cell: it needs DemoSettings.grid > 0")
    from tqdm.auto import tqdm  # type: ignore[import-untyped, unused-ignore]

    tower = model.model.visual
    width = model.config.text_config.hidden_size  # the merger's output: what the LLM reads
    heads = nn.ModuleDict({"kind": nn.Linear(width, len(KINDS) + 1), "colour": nn.Linear(width, len(_COLOURS) + 1)})
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=spec.lr, weight_decay=0.0)
    rng = np.random.default_rng([settings.seed, 0x7001])
    output_dir.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    tower.train()
    start = time.perf_counter()
    with (output_dir / "metrics.jsonl").open("w", encoding="utf-8") as log:
        for step in tqdm(range(1, spec.steps + 1), desc="V0 tower", disable=None if progress else True, leave=False):
            scenes = [_scene(rng, settings, spec) for _ in range(spec.scenes_per_step)]
            labels = [cell_labels(s, settings.grid) for s in scenes]
            inputs = processor.image_processor([s.render() for s in scenes])
            merged = tower(inputs["pixel_values"], inputs["image_grid_thw"]).merged
            kinds, colours = torch.cat([k for k, _ in labels]), torch.cat([c for _, c in labels])
            if merged.shape[0] != kinds.shape[0]:
                raise ValueError(f"{merged.shape[0]} merged tokens for {kinds.shape[0]} cells: grid != patch x merge")
            kind_logits, colour_logits = heads["kind"](merged), heads["colour"](merged)
            loss = nn.functional.cross_entropy(kind_logits, kinds) + nn.functional.cross_entropy(colour_logits, colours)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            occupied = kinds != EMPTY_KIND
            record = {
                "step": step,
                "loss": losses[-1],
                "kind_accuracy": float((kind_logits.argmax(-1) == kinds)[occupied].float().mean()),
                "colour_accuracy": float((colour_logits.argmax(-1) == colours)[occupied].float().mean()),
            }
            log.write(json.dumps(record) + "\n")
    tower.zero_grad(set_to_none=True)
    return time.perf_counter() - start, losses
