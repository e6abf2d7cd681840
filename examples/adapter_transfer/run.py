"""Adapter-only reasoning VLM (Skywork-R1V style): train an adapter on an instruct LLM, move it to a reasoning LLM.

Usage::

    python examples/adapter_transfer/run.py             # the measured run (README: time and results)
    python examples/adapter_transfer/run.py --smoke     # tiny sizes, a few steps per stage: the plumbing

Steps (``at_recipe``): pretrain the parts (V0 tower, instruct LLM and reasoning LLM on the text view of
the synthetic tasks, the reasoning LLM with another tokenizer) -> per seed: baseline (reasoning LLM,
fresh adapter) -> A (adapter on the instruct LLM, tower and LLM frozen and checked bit-identical) ->
B (swap in the reasoning LLM, token ids re-mapped and checked) -> C (hybrid SFT) -> D (filtered SFT
on the items C gets wrong) -> E (GRPO) -> ``OUTPUT/report.md`` with the held-out accuracy per stage and
task over the seeds, the gains against the seed spread, and the wall times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from at_models import smoke_model
from at_recipe import STAGES, RecipeSettings, SeedResult, build_parts, heldout_set, load_parts, run_seed, save_parts
from at_report import accuracy_table, gain, write_report
from at_stages import GRPOSpec
from demo_eval import CHANCE, majority_baseline
from demo_vision import TowerSpec

LABELS = {
    "baseline": "baseline: reasoning LLM, fresh adapter",
    "A": "A: instruct LLM + adapter (adapter trained)",
    "B": "B: reasoning LLM swapped in (no training)",
    "C": "C: hybrid SFT (adapter)",
    "D": "D: filtered SFT on wrong items (adapter)",
    "E": "E: GRPO (adapter)",
}
"""Report row label of every stage."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Adapter-only reasoning VLM: train on instruct, transfer to reasoning."
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps per stage")
    parser.add_argument(
        "--output", default="runs/adapter_transfer", help="output folder (default runs/adapter_transfer)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="recipe seeds (default 0 1 2; smoke 0 1)")
    parser.add_argument("--eval-size", type=int, default=None, help="held-out samples per task (default 100)")
    parser.add_argument(
        "--parts",
        default=None,
        help="file of pretrained parts: reused when it exists and matches the settings, else built and saved there",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.eval_size is not None and args.eval_size < 1:
        parser.error(f"--eval-size must be >= 1, got {args.eval_size}")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def smoke_settings() -> RecipeSettings:
    """Tiny parts and two steps per stage: checks the plumbing in seconds (the numbers mean nothing)."""
    model = smoke_model(tower=TowerSpec(steps=2, scenes_per_step=2))
    small: dict[str, Any] = {"steps": 2, "warmup_steps": 1, "micro_batch_size": 2, "max_length": 256}
    base = RecipeSettings()
    return RecipeSettings(
        model=model,
        data_size=64,
        instruct=dataclasses.replace(base.instruct, **small),
        reasoning=dataclasses.replace(base.reasoning, **small),
        stage_a=dataclasses.replace(base.stage_a, **small),
        stage_c=dataclasses.replace(base.stage_c, **small),
        stage_d=dataclasses.replace(base.stage_d, **small),
        filter_pool=3,
        grpo=GRPOSpec(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4),
        eval_size=2,
        max_new_tokens=4,
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _json(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recipe; returns the exit status."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = smoke_settings() if args.smoke else RecipeSettings()
    if args.eval_size:
        settings.eval_size = args.eval_size
    seeds = args.seeds or ([0, 1] if args.smoke else [0, 1, 2])
    progress, out = not args.no_progress, Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    heldout = heldout_set(settings)
    print(f"adapter_transfer: {len(heldout)} held-out samples, seeds {seeds}; outputs in {out.resolve()}")

    if args.parts and Path(args.parts).is_file():
        parts = load_parts(settings, Path(args.parts))
        print(f"adapter_transfer: pretrained parts loaded from {args.parts} (their build times are those of that run)")
    else:
        parts = build_parts(settings, heldout, out / "parts", progress=progress)
        if args.parts:
            save_parts(parts, settings, Path(args.parts))
    for name, scores in parts.ceilings.items():
        print(
            f"adapter_transfer: {name} LLM on the text view: "
            + ", ".join(f"{t} {100 * v:.0f}%" for t, v in scores.items())
        )
    results: list[SeedResult] = []
    for seed in seeds:
        results.append(run_seed(parts, settings, heldout, seed, out, progress=progress))

    tasks = list(settings.eval_tasks)
    rows: list[tuple[str, Sequence[dict[str, float]]]] = [
        ("instruct LLM alone, text view (its ceiling)", [parts.ceilings["instruct"]]),
        ("reasoning LLM alone, text view (its ceiling)", [parts.ceilings["reasoning"]]),
    ]
    rows += [(LABELS[stage], [r.scores[stage] for r in results]) for stage in STAGES]
    rows += [("majority answer", [majority_baseline(heldout)]), ("chance", [{t: CHANCE[t] for t in tasks}])]
    table = accuracy_table(rows, tasks)
    by_stage = {stage: [r.scores[stage] for r in results] for stage in STAGES}
    gains = [
        gain("E (whole recipe) over the baseline", by_stage["E"], by_stage["baseline"]),
        gain("B (adapter moved, untrained on the new LLM) over the baseline", by_stage["B"], by_stage["baseline"]),
        gain("C over B", by_stage["C"], by_stage["B"]),
        gain("D over C", by_stage["D"], by_stage["C"]),
        gain("E over D", by_stage["E"], by_stage["D"]),
    ]
    times = dict(parts.seconds)
    for key in results[0].seconds:
        times[f"{key} (all seeds)"] = sum(r.seconds.get(key, 0.0) for r in results)
    times["total"] = time.perf_counter() - start
    remapped = results[0].remapped
    notes = [
        "Token ids re-mapped at the swap (instruct -> reasoning tokenizer): "
        + ", ".join(f"{k} {a} -> {b}" for k, a, b in ((k, *v) for k, v in remapped.items())),
        "Tower and LLM checked bit-identical after stage A (instruct LLM) and after stages B to E (reasoning LLM).",
        "Filtered SFT items (wrong after C, of the scored training items): "
        + ", ".join(f"seed {r.seed}: {r.filtered[1]} of {r.filtered[0]}" for r in results),
        "GRPO training reward (mean of the first 5 steps -> the last 5): "
        + ", ".join(f"seed {r.seed}: {_mean(r.rewards[:5]):.3f} -> {_mean(r.rewards[-5:]):.3f}" for r in results),
        f"Held-out set: {settings.eval_size} samples per task, greedy non-thinking answers, scored by the synthetic "
        "verifier; accuracy in % as mean ± sample standard deviation over the seeds.",
        f"Seeds {seeds}: each seeds the adapter's initialisation, the data order and the RL sampling; the "
        "pretrained parts (tower, LLMs) are the same for every seed.",
        f"{torch.get_num_threads()} torch threads.",
    ]
    (out / "results.json").write_text(
        json.dumps(
            {"ceilings": parts.ceilings, "seeds": [dataclasses.asdict(r) for r in results], "times": times},
            indent=2,
        ),
        encoding="utf-8",
    )
    (out / "settings.json").write_text(
        json.dumps(dataclasses.asdict(settings), indent=2, default=_json), encoding="utf-8"
    )
    report = write_report(
        out / "report.md",
        title=f"Adapter transfer, Skywork-R1V style ({len(seeds)} seeds{', smoke' if args.smoke else ''})",
        intro="Held-out accuracy (%) per task after every stage.",
        table=table,
        gains=gains,
        times=times,
        notes=notes,
    )
    print(table)
    for g in gains:
        print(g.line())
    print(f"adapter_transfer: report {report.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
