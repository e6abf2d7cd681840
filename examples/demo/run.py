"""The suite's main job: train a tiny Qwen3-VL-style model through the whole pipeline and show it learned.

Usage::

    python examples/demo/run.py                 # dense model, about 14 minutes on a quiet 2-core CPU
    python examples/demo/run.py --moe           # MoE text layers
    python examples/demo/run.py --smoke         # a few steps per stage (a test of the plumbing)

Steps: build the model from the suite's parts -> evaluate -> V0 (the tower alone on cell labels, a
stand-in for a pretrained SigLIP-2 tower, ``demo_vision``) -> S0 (merger only) -> evaluate -> S1 (all
parameters) -> evaluate -> SFT (thinking format on part of the samples) -> evaluate -> RL (SAPO on the
image-comparison prompts, reward = the synthetic verifier) -> evaluate -> save in Hugging Face
format -> reload with ``AutoModelForImageTextToText`` -> answer example questions -> write
``OUTPUT/report.md`` with the accuracy table, wall times and plots.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_eval import CHANCE, EvalSummary, evaluate_samples, majority_baseline
from demo_pipeline import DemoSettings, build_demo_model, default_stages, run_stage, settings_dict
from demo_questions import ask_examples, example_samples, reload_model, save_model
from demo_report import accuracy_table, plot_rewards, plot_stage_losses, write_report
from demo_rl import RLSpec, rl_available, run_rl
from demo_vision import TowerSpec, pretrain_tower

from vl_train.data.synthetic import TASK_NAMES, SyntheticDataset

TARGET_TASKS = ("count", "colour")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Train a tiny Qwen3-VL-style model S0 -> S1 -> SFT -> RL.")
    parser.add_argument("--moe", action="store_true", help="mixture-of-experts text layers")
    parser.add_argument("--smoke", action="store_true", help="a few steps per stage and a few eval samples")
    parser.add_argument("--output", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="model and data seed")
    parser.add_argument("--eval-size", type=int, default=None, help="held-out samples per task (default 100)")
    parser.add_argument("--no-rl", action="store_true", help="skip the RL stage")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.eval_size is not None and args.eval_size < 1:
        parser.error(f"--eval-size must be >= 1, got {args.eval_size}")
    return args


def heldout_samples(per_task: int, seed: int, image_size_range: tuple[int, int], grid: int = 0) -> list[dict[str, Any]]:
    """``per_task`` held-out samples of every task (never seen in training: disjoint split)."""
    out: list[dict[str, Any]] = []
    for task in TASK_NAMES:
        ds = SyntheticDataset(
            "heldout",
            size=per_task,
            seed=seed,
            tasks=[task],
            image_size_range=image_size_range,
            video_frames=(2, 4),
            thinking=0.0,
            grid=grid,
        )
        out.extend(ds)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings(moe=args.moe, seed=args.seed)
    rl_spec = RLSpec(image_size_range=settings.image_size_range, grid=settings.grid)
    if args.smoke:
        settings.stages = default_stages(scale=0.0)  # 2 steps each
        settings.text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
        settings.vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "patch_size": 8}
        settings.micro_batch_size, settings.max_length, settings.data_size = 2, 384, 64
        settings.image_size_range, settings.max_pixels, settings.grid = (48, 64), 64 * 64, 16
        settings.tower = TowerSpec(steps=2, scenes_per_step=2)
        rl_spec = RLSpec(
            steps=2,
            prompts_per_step=2,
            group_size=2,
            eval_size=4,
            eval_samples_per_prompt=2,
            seeds=(0, 1),
            max_new_tokens=8,
            image_size_range=settings.image_size_range,
            grid=settings.grid,
        )
    eval_size = args.eval_size or (2 if args.smoke else 100)
    max_new_tokens = 8 if args.smoke else 40
    heldout = heldout_samples(eval_size, args.seed, settings.image_size_range, settings.grid)
    start = time.perf_counter()

    model, processor = build_demo_model(settings)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo: {'MoE' if args.moe else 'dense'} model with {n_params:,} parameters; outputs in {out.resolve()}")

    eval_seconds = [0.0]

    def evaluate(label: str) -> EvalSummary:
        t = time.perf_counter()
        result = evaluate_samples(
            model, processor, heldout, max_new_tokens=max_new_tokens, progress=progress, desc=f"eval {label}"
        )
        scores = ", ".join(f"{t} {100 * result.per_task[t]:.0f}%" for t in TARGET_TASKS if t in result.per_task)
        print(f"demo: held-out after {label}: mean {100 * result.mean:.1f}% ({scores})")
        eval_seconds[0] += time.perf_counter() - t
        return result

    rows: list[tuple[str, dict[str, float]]] = [("before training", evaluate("init").per_task)]
    times: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    if settings.tower.steps:
        print(f"demo: stage V0: the tower alone, {settings.tower.steps} steps at lr {settings.tower.lr:g}")
        times["V0"], losses["V0"] = pretrain_tower(
            model, processor, settings, settings.tower, out / "V0", progress=progress
        )
        print(f"demo: V0 loss {losses['V0'][0]:.3f} -> {losses['V0'][-1]:.3f} in {times['V0']:.0f} s")
    for spec in settings.stages:
        print(f"demo: stage {spec.name}: {spec.steps} steps at lr {spec.lr:g}")
        run = run_stage(model, processor, settings, spec, out / spec.name, progress=progress)
        times[spec.name], losses[spec.name] = run.seconds, run.losses
        print(f"demo: {spec.name} loss {run.losses[0]:.3f} -> {run.losses[-1]:.3f} in {run.seconds:.0f} s")
        rows.append((f"after {spec.name}", evaluate(spec.name).per_task))

    figures = {"Training loss per stage": "loss_per_stage.png"}
    plot_stage_losses(losses, out / "loss_per_stage.png")
    notes: list[str] = []
    if args.no_rl:
        notes.append("RL was skipped (--no-rl).")
    elif not rl_available():
        notes.append("RL was skipped: vl_rl.trainer.RLTrainer is not importable in this installation.")
        print(f"demo: {notes[-1]}")
    else:
        rl = run_rl(model, processor, rl_spec, out / "RL", seed=args.seed, progress=progress)
        times["RL"] = rl.seconds
        rows.append(("after RL", evaluate("RL").per_task))
        plot_rewards(rl.rewards, out / "rl_reward.png", evals=rl.evals)
        figures["Reward during RL"] = "rl_reward.png"
        notes.append(rl.summary(rl_spec.method, rl_spec.tasks, rl_spec.eval_size, rl_spec.eval_samples_per_prompt))
        print(f"demo: {notes[-1]}")

    t0 = time.perf_counter()
    folder = save_model(model, processor, out / "model")
    reloaded, reloaded_processor = reload_model(folder)
    qa = ask_examples(
        reloaded,
        reloaded_processor,
        example_samples(image_size_range=settings.image_size_range, grid=settings.grid),
        out / "examples",
    )
    times["held-out evaluations (all)"] = eval_seconds[0]
    times["save + reload + Q/A"] = time.perf_counter() - t0
    for item in qa:
        print(f"Q ({item.kind}): {item.question}\nA: {item.answer}   [expected: {item.expected}]")

    chance = {t: CHANCE[t] for t in TASK_NAMES}
    majority = majority_baseline(heldout)
    table = accuracy_table([*rows, ("majority answer", majority)], chance, tasks=list(TASK_NAMES))
    notes.append(
        "The `majority answer` row scores always giving each task's most frequent held-out answer: the bar "
        "accuracy must clear to show the model reads the image (uniform `chance` understates it)."
    )
    notes.append(f"Held-out set: {eval_size} samples per task, greedy decoding, scored by the synthetic verifier.")
    notes.append(f"Total wall time {time.perf_counter() - start:.0f} s with {torch.get_num_threads()} torch threads.")
    (out / "settings.json").write_text(json.dumps(settings_dict(settings), indent=2, default=str), encoding="utf-8")
    (out / "accuracy.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    report = write_report(
        out / "report.md",
        title=f"vl suite demo ({'MoE' if args.moe else 'dense'}, seed {args.seed}{', smoke' if args.smoke else ''})",
        table=table,
        times=times,
        qa=qa,
        figures=figures,
        notes=notes,
    )
    print(table)
    print(f"demo: report {report.resolve()}")
    for label, name in figures.items():
        print(f"demo: {label.lower()}: {(out / name).resolve()}")
    print(f"demo: Hugging Face model {folder.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
