"""``vl-train``: run a TOML training recipe with command-line overrides and report where the outputs went.

Usage::

    vl-train demo_s0                                   # a packaged demo recipe (vl_train/testing/recipes)
    vl-train my_recipe.toml --set optim.lr=1e-4 --set data.size=200 --output runs/x
    vl-train demo_s1 --init-from runs/demo_s0          # start from a previous stage's output
    vl-train my_recipe.toml --output runs/x --resume   # continue a stopped run
    torchrun --nproc-per-node 8 -m vl_train my_recipe.toml --output runs/x   # FSDP2 over 8 GPUs
    vl-train plan --model Qwen3-VL-8B --tokens 32768 --world 16 --cp 2   # memory per GPU (vl_train.plan)

The recipe format is :mod:`vl_train.recipe`'s; the model, processor and data are built by
:mod:`vl_train.builders`. The run writes what the trainer writes (checkpoints, ``metrics.jsonl``, the
loss-curve PNG) and the final model with its processor as ``OUTPUT/model``, which the next stage's
``init_from`` reads. The model trains on GPU ``LOCAL_RANK`` when CUDA is available, else on the CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .builders import save_final_model
from .recipe import apply_overrides, load_recipe, packaged_recipes, resolve_config

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vl-train", description="Run a vl-train TOML recipe.")
    parser.add_argument(
        "recipe", nargs="?", help=f"a recipe file or a packaged recipe name ({', '.join(packaged_recipes())})"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--output", help="output folder (overrides train.output_dir)")
    parser.add_argument("--init-from", help="start from this model folder or previous run's output")
    parser.add_argument("--resume", action="store_true", help="continue from the latest valid checkpoint in the output")
    parser.add_argument(
        "--overwrite", action="store_true", help="start afresh in an output folder that holds a run (deletes it)"
    )
    parser.add_argument("--dry-run", action="store_true", help="build everything and print the config, no training")
    parser.add_argument("--list", action="store_true", help="list the packaged recipes and stage presets")
    return parser


def _report(output_dir: Path, result: Any) -> None:
    print(f"vl-train: stopped after {getattr(result, 'steps', '?')} steps ({getattr(result, 'stopped_reason', '?')})")
    stats = getattr(result, "data_stats", None)
    if stats:
        print("vl-train: data: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    losses = list(getattr(result, "losses", []) or [])
    if losses:
        print(f"vl-train: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"vl-train: outputs in {output_dir.resolve()}")
    print(f"  final model: {(output_dir / 'model').resolve()}")
    for pattern, what in (("metrics*.jsonl", "metrics"), ("*.png", "loss curve"), ("checkpoint*", "checkpoint")):
        for path in sorted(output_dir.glob(pattern)) + sorted(output_dir.glob(f"*/{pattern}")):
            if "model" not in path.parts[-2:-1]:
                print(f"  {what}: {path.resolve()}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vl-train`` / ``python -m vl_train``; returns the exit status.

    Under ``torchrun`` every rank runs it: the ranks join the process group, shard the model with FSDP2
    (and the recipe's context / expert parallelism), draw their own batches, and rank 0 prints and writes.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:  # the memory planner's own options (vl_train.plan)
        from .plan import main as plan_main

        return plan_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.list:
        from .stages import STAGES

        print("packaged recipes:", ", ".join(packaged_recipes()))
        print("stage presets:", ", ".join(STAGES))
        return 0
    if not args.recipe:
        _parser().print_usage(sys.stderr)
        return 2
    from .parallel import run_launched

    return run_launched("vl-train", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from .builders import build_data, build_model
    from .context_parallel import DataParallelBatches
    from .distill_run import check_teacher
    from .parallel import is_main_process, training_device, world_size

    say = print if is_main_process() else _quiet
    try:
        recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
        if args.init_from:
            recipe.setdefault("model", {})["init_from"] = args.init_from
        config = resolve_config(recipe, args.output)
        distilling = check_teacher(recipe, config)
        model, processor = build_model(recipe.get("model", {}))
        model.to(training_device())
        batches: Any = None if distilling else build_data(recipe.get("data", {}), processor, config)
        if batches is not None and world_size() > 1:  # each data-parallel group its own batches
            batches = DataParallelBatches(batches, config.context_parallel)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vl-train: error: {exc}", file=sys.stderr)
        return 2
    say(
        f"vl-train: recipe {args.recipe} (preset {config.stage}), {sum(p.numel() for p in model.parameters())} "
        f"parameters on {training_device()}" + (f", {world_size()} ranks" if world_size() > 1 else "")
    )
    if args.dry_run:
        say(config)
        return 0
    from .trainer import Trainer

    run = {"resume": args.resume, "overwrite": args.overwrite}
    try:  # Trainer (and DistillTrainer) freeze every part outside config.trainable
        if batches is None:
            from .distill_run import run_distill

            result = run_distill(recipe, config, model, processor, **run)
        else:
            trainer = Trainer(model, config, batches, **run)
            if trainer.resumed_from is not None:
                say(f"vl-train: resumed from {trainer.resumed_from} at step {trainer.step}")
            result = trainer.train()
    except (ValueError, FileNotFoundError) as exc:  # e.g. a folder holding another run, before any training
        print(f"vl-train: error: {exc}", file=sys.stderr)
        return 2
    output_dir = Path(getattr(result, "output_dir", None) or config.output_dir)
    if result.stopped_reason.startswith("interrupted"):
        if is_main_process():
            print(
                f"vl-train: {result.stopped_reason} at step {result.steps}: checkpoint {result.checkpoint}; continue "
                f"with `vl-train {args.recipe} --output {output_dir} --resume` (plus the same --set options)",
                file=sys.stderr,
            )
        return 130
    save_final_model(model, processor, recipe.get("model", {}), output_dir)
    if not is_main_process():
        return 0
    _report(output_dir, result)
    examples = getattr(getattr(batches, "stats", None), "report", lambda: "")()
    lost = {k: v for k, v in result.data_stats.items() if k not in ("seen", "rendered")}
    if lost:
        print(
            f"vl-train: samples not trained as given, counted per draw (the data cycles): {lost} "
            f"(also in metrics.jsonl as data/*):\n{examples}"
        )
    return 0


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """``print`` on ranks other than 0."""
