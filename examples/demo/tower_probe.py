"""How fast the demo's vision tower alone learns shape kinds, with shapes placed freely or one per token.

The tower (and merger) of a fresh demo model is trained with a small head on synthetic scenes, without
the LLM, and scored on 200 held-out scenes every 100 steps (16 scenes per step):

- ``kind``: one shape per image; max-pool the merged tokens, then a linear layer names its kind.
- ``colour``: one shape of the asked kind plus 0-4 shapes of other kinds; a learned query per kind
  attends over the merged tokens and a linear layer names the colour of the shape of that kind (what
  the demo's colour question asks, without the language model).

    python examples/demo/tower_probe.py kind --grid 0              # shapes anywhere, patch 16
    python examples/demo/tower_probe.py kind --grid 32             # one shape per 32 px visual token

Prints one JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from demo_pipeline import DemoSettings, build_demo_model
from torch import nn

from vl_train.data._shapes import COLOURS, KINDS, Scene

_COLOURS = tuple(COLOURS)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["kind", "colour"])
    parser.add_argument("--grid", type=int, default=32, help="cell side of the scenes (0: free placement)")
    parser.add_argument("--patch", type=int, default=16, help="tower patch size")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.grid != 0 and not 16 <= args.grid <= 96:  # 96: the smallest canvas side of the demo's scenes
        parser.error(f"--grid must be 0 (shapes anywhere) or between 16 and 96, got {args.grid}")
    return args


def draw(
    rng: np.random.Generator, task: str, grid: int, size_range: tuple[int, int]
) -> tuple[PIL.Image.Image, int, int]:
    """``(image, asked kind, target)``: the target is the kind (task ``kind``) or the colour's index."""
    while True:
        scene = Scene.random(rng, size_range, grid)
        kind, colour = int(rng.integers(len(KINDS))), int(rng.integers(len(_COLOURS)))
        labels = [(KINDS[kind], _COLOURS[colour])]
        if task == "colour":
            others = [k for k in KINDS if k != KINDS[kind]]
            for _ in range(int(rng.integers(0, 5))):
                labels.append((others[int(rng.integers(len(others)))], _COLOURS[int(rng.integers(len(_COLOURS)))]))
        if not scene.fill(rng, labels[:1]):  # the asked shape found a place
            scene.fill(rng, labels[1:])
            return scene.render(), kind, kind if task == "kind" else colour


class Head(nn.Module):
    """Max-pool + linear (``kind``), or one attention query per kind + linear (``colour``)."""

    def __init__(self, task: str, width: int) -> None:
        super().__init__()
        self.task = task
        self.query = nn.Embedding(len(KINDS), width)
        self.out = nn.Linear(width, len(KINDS) if task == "kind" else len(_COLOURS))

    def forward(self, tokens: list[torch.Tensor], kinds: list[int]) -> torch.Tensor:
        pooled = []
        for t, k in zip(tokens, kinds):
            if self.task == "kind":
                pooled.append(t.max(0).values)
            else:
                weights = torch.softmax(t @ self.query.weight[k] / t.shape[-1] ** 0.5, 0)
                pooled.append((weights[:, None] * t).sum(0))
        return self.out(torch.stack(pooled))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train and evaluate; returns the evaluation rows."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = DemoSettings()
    settings.vision = {**settings.vision, "patch_size": args.patch}
    model, processor = build_demo_model(settings)
    tower = model.model.visual
    head = Head(args.task, model.config.text_config.hidden_size)
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.0)

    def logits(batch: list[tuple[PIL.Image.Image, int, int]]) -> torch.Tensor:
        images, kinds, _ = zip(*batch)
        inputs = processor.image_processor(list(images))
        merged = tower(inputs["pixel_values"], inputs["image_grid_thw"]).merged
        sizes = (inputs["image_grid_thw"].prod(-1) // tower.config.spatial_merge_size**2).tolist()
        return head(list(merged.split(sizes)), list(kinds))

    train_rng, eval_rng = np.random.default_rng(0), np.random.default_rng(99)
    held = [draw(eval_rng, args.task, args.grid, settings.image_size_range) for _ in range(200)]
    held_targets = torch.tensor([t for _, _, t in held])
    rows, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = [draw(train_rng, args.task, args.grid, settings.image_size_range) for _ in range(16)]
        loss = nn.functional.cross_entropy(logits(batch), torch.tensor([t for _, _, t in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                accuracy = (logits(held).argmax(-1) == held_targets).float().mean().item()
            row = {"task": args.task, "grid": args.grid, "patch": args.patch, "step": step, "accuracy": accuracy}
            row["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    run(parse_args())
