"""Short S0 + S1 runs of the demo model to find what limits counting and colour (the README's probe table).

Each run trains a fresh demo model (``DemoSettings`` with the overrides given) through S0 (100 steps) and
one or two S1 phases, then scores greedy answers to ``--eval-size`` held-out counting and colour prompts.
Colour accuracy is also split by how many distinct shape colours the image holds: a model that reads
colours but cannot tell the shape kinds apart is right on one-colour images and near chance on the rest.

    python examples/demo/probe.py colour_only --mixture '{"colour": 1}' --steps 600
    python examples/demo/probe.py curriculum --mixture '{"colour": 1}' --steps 1500 \\
        --then-mixture '{"colour": 1, "count": 1.5}' --then-steps 1500

Results are printed as one JSON line and appended to ``--log`` (default ``runs/probe/results.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from demo_eval import evaluate_samples
from demo_pipeline import DemoSettings, StageSpec, build_demo_model, run_stage

from vl_train.data._shapes import COLOURS
from vl_train.data.synthetic import SyntheticDataset


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="label of the run (also its folder under runs/probe)")
    parser.add_argument("--mixture", type=json.loads, default=None, help="S1 task weights (default: the demo's)")
    parser.add_argument("--s0-steps", type=int, default=100, help="S0 steps")
    parser.add_argument("--steps", type=int, default=1000, help="S1 steps")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lr-vision", type=float, default=1e-3)
    parser.add_argument("--then-mixture", type=json.loads, default=None, help="task weights of a second S1 phase")
    parser.add_argument("--then-steps", type=int, default=0)
    parser.add_argument("--settings", type=json.loads, default={}, help="DemoSettings overrides, e.g. vision")
    parser.add_argument("--eval-size", type=int, default=100, help="held-out prompts per task")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", type=Path, default=Path("runs/probe/results.jsonl"))
    return parser.parse_args(argv)


def colours_present(sample: dict[str, Any]) -> int:
    """How many of the dataset's colours occur exactly in the sample's image."""
    image = next(c["image"] for c in sample["messages"][0]["content"] if c.get("type") == "image")
    pixels = np.asarray(image).reshape(-1, 3)
    return sum(bool((pixels == np.array(rgb)).all(1).any()) for rgb in COLOURS.values())


def score(model: Any, processor: Any, settings: DemoSettings, eval_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in ("count", "colour"):
        samples = list(
            SyntheticDataset(
                "heldout",
                size=eval_size,
                seed=5,
                tasks=[task],
                image_size_range=settings.image_size_range,
                grid=settings.grid,
            )
        )
        result = evaluate_samples(model, processor, samples, max_new_tokens=6, progress=False)
        out[task] = round(result.per_task[task], 3)
        out[f"{task}_top_answers"] = Counter(result.responses).most_common(3)
        if task == "colour":
            by_n: dict[int, list[float]] = defaultdict(list)
            for sample, s in zip(samples, result.scores):
                by_n[colours_present(sample)].append(s)
            out["colour_by_colours_present"] = {n: (len(v), round(sum(v) / len(v), 2)) for n, v in sorted(by_n.items())}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = DemoSettings(**args.settings)
    if args.mixture is not None:
        settings.mixture = dict(args.mixture)
    folder = args.log.parent / args.name
    phases = [
        (StageSpec("S0", args.s0_steps, 3e-3, warmup_steps=min(10, args.s0_steps - 1)), settings.mixture),
        (StageSpec("S1", args.steps, args.lr, args.lr_vision), settings.mixture),
    ]
    if args.then_steps:
        then = StageSpec("S1", args.then_steps, args.lr / 2, args.lr_vision / 2)
        phases.append((then, dict(args.then_mixture or settings.mixture)))
    model, processor = build_demo_model(settings)
    start = time.perf_counter()
    for k, (spec, mixture) in enumerate(phases):
        settings.mixture, settings.stages = mixture, [p for p, _ in phases]
        run_stage(model, processor, settings, spec, folder / f"{k}_{spec.name}", progress=False)
    row = {
        "name": args.name,
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "train_s": round(time.perf_counter() - start),
    }
    row.update(score(model, processor, settings, args.eval_size))
    print(json.dumps(row))
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
