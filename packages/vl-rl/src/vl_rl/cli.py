"""``vl-rl``: run a TOML RL recipe with command-line overrides and report where the outputs went.

Usage::

    vl-rl demo_sapo                                   # a packaged demo recipe (vl_rl/testing/recipes)
    vl-rl demo_gspo --init-from runs/demo_sft         # start from a vl-train SFT run's output
    vl-rl my_recipe.toml --set optim.lr=1e-4 --set data.tasks='["count"]' --output runs/x

A recipe has four sections; every key is checked and an unknown one is an error naming it and the
known ones:

- ``[model]``: as in ``vl-train`` (:func:`vl_train.builders.build_model`): ``init_from`` (a model folder
  with its processor, or a previous run's output with ``model/`` in it), else a fresh model from
  ``[model.text]`` / ``[model.vision]`` and ``tokenizer``; image budgets; ``seed``.
- ``[data]``: synthetic prompts (:class:`vl_train.data.synthetic.SyntheticDataset`): ``tasks``,
  ``size``, ``seed``, ``image_size_range``, ``grid`` (cell side; 0 free placement), ``thinking`` (share
  of samples with reasoning), and the held-out split's ``heldout_size`` (0: no evaluation) and
  ``heldout_seed``.
- ``[rl]``: :class:`~vl_rl.config.RLConfig` fields; ``[optim]``: the optimiser
  (:class:`vl_train.OptimConfig`, the section every trainer shares).
- ``[reward]``: ``kind = "synthetic"`` (:func:`vl_train.data.synthetic.verify`) plus optional weighted
  terms ``format_weight`` (:func:`vl_rl.rewards.format_reward`, think tags) and ``repetition_weight``
  (:func:`vl_rl.rewards.repetition_reward`, in [-1, 0]).

``--set section.key=value`` parses ``value`` as TOML (``1e-4``, ``true``, ``[1, 2]``), else as a string.
The run writes ``metrics.jsonl``, checkpoints, ``reward_curve.png`` and the final model as
``OUTPUT/model`` (``save_pretrained``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vl_train import recipe as train_recipe
from vl_train.config import OptimConfig

from .config import RLConfig

__all__ = ["build_reward", "load_recipe", "main", "packaged_recipes", "resolve_config"]

_TOP = {"description", "model", "data", "optim", "rl", "reward"}
_DATA = {"tasks", "size", "seed", "image_size_range", "grid", "thinking", "heldout_size", "heldout_seed"}
_REWARD = {"kind", "format_weight", "repetition_weight"}


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped in ``vl_rl/recipes``."""
    return train_recipe.packaged_recipes("vl_rl")


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe file, or a packaged recipe by name (``"demo_sapo"`` or ``"demo_sapo.toml"``).

    Raises:
        FileNotFoundError: Neither a file nor a packaged recipe (the packaged ones are listed).
    """
    return train_recipe.load_recipe(name_or_path, "vl_rl")


def resolve_config(recipe: Mapping[str, Any], output: str | None = None) -> RLConfig:
    """Check every section of ``recipe`` and return its :class:`~vl_rl.config.RLConfig`.

    Raises:
        ValueError: An unknown key anywhere (named), or invalid values.
    """
    train_recipe.check_keys("the recipe", recipe, _TOP)
    train_recipe.check_keys("[model]", recipe.get("model", {}), train_recipe.MODEL_KEYS)
    train_recipe.check_keys("[data]", recipe.get("data", {}), _DATA)
    reward = recipe.get("reward", {})
    train_recipe.check_keys("[reward]", reward, _REWARD)
    if reward.get("kind", "synthetic") != "synthetic":
        raise ValueError(f"unknown reward kind {reward.get('kind')!r}; kinds are ['synthetic']")
    rl = dict(recipe.get("rl", {}))
    misplaced = sorted(k for k in rl if k in {f.name for f in dataclasses.fields(OptimConfig)} or k == "optim")
    if misplaced:
        raise ValueError(f"[rl] keys {misplaced} are optimiser settings: put them in the [optim] section")
    if output is not None:
        rl["output_dir"] = output
    if recipe.get("optim"):
        rl["optim"] = RLConfig().optim.replace(**dict(recipe["optim"]))
    return RLConfig.from_dict(rl)


def build_reward(section: Mapping[str, Any]) -> Callable[[dict[str, Any], str], float]:
    """``reward(sample, response)``: the synthetic verifier plus the weighted format / repetition terms."""
    from vl_train.data.synthetic import verify

    from .evaluate import prompt_of
    from .rewards import format_reward, repetition_reward

    w_format = float(section.get("format_weight", 0.0))
    w_repeat = float(section.get("repetition_weight", 0.0))

    def reward(sample: dict[str, Any], response: str) -> float:
        value = verify(sample, response)
        if w_format:
            value += w_format * format_reward(prompt_of(sample), response, sample)
        if w_repeat:
            value += w_repeat * repetition_reward(prompt_of(sample), response, sample)
        return value

    reward.__name__ = "synthetic"
    return reward


def _datasets(section: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from vl_train.data.synthetic import SyntheticDataset

    common: dict[str, Any] = {
        "tasks": section.get("tasks"),
        "thinking": float(section.get("thinking", 0.0)),
        "grid": int(section.get("grid", 0)),
    }
    if "image_size_range" in section:
        common["image_size_range"] = tuple(section["image_size_range"])
    train = SyntheticDataset("train", size=int(section.get("size", 512)), seed=int(section.get("seed", 0)), **common)
    size = int(section.get("heldout_size", 64))
    held = SyntheticDataset("heldout", size=size, seed=int(section.get("heldout_seed", 0)), **common)
    return list(train), list(held)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vl-rl", description="Run a vl-rl TOML recipe.")
    parser.add_argument("recipe", nargs="?", help="a recipe file or a packaged recipe name")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--output", help="output folder (overrides rl.output_dir)")
    parser.add_argument("--init-from", help="start from this model folder or a previous run's output")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output")
    parser.add_argument("--dry-run", action="store_true", help="check the recipe and print the config, no training")
    parser.add_argument("--list", action="store_true", help="list the packaged recipes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vl-rl`` / ``python -m vl_rl``; returns the exit status."""
    from vl_train.builders import build_model, checkpoint_layout, save_model
    from vl_train.recipe import apply_overrides

    args = _parser().parse_args(argv)
    if args.list:
        print("packaged recipes:", ", ".join(packaged_recipes()))
        return 0
    if not args.recipe:
        _parser().print_usage(sys.stderr)
        return 2
    try:
        recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
        if args.init_from:
            recipe.setdefault("model", {})["init_from"] = args.init_from
        config = resolve_config(recipe, args.output)
        if args.dry_run:
            print(f"vl-rl: recipe {args.recipe} is valid; config: {config.to_dict()}")
            return 0
        model, processor = build_model(recipe.get("model", {}))
        train, held = _datasets(recipe.get("data", {}))
    except (ValueError, FileNotFoundError) as exc:
        print(f"vl-rl: error: {exc}", file=sys.stderr)
        return 2
    from .trainer import RLTrainer

    print(f"vl-rl: recipe {args.recipe} ({config.method}), {sum(p.numel() for p in model.parameters())} parameters")
    trainer = RLTrainer(
        model,
        processor,
        config,
        train,
        build_reward(recipe.get("reward", {})),
        eval_samples=held or None,
        resume=args.resume,
    )
    result = trainer.train()
    out = result.output_dir
    save_model(model, processor, out / "model", checkpoint_layout(recipe.get("model", {})))
    if result.eval_history:
        first, last = result.eval_history[0], result.eval_history[-1]
        print(
            f"vl-rl: held-out reward {first['eval_reward']:.3f} (step {first['step']}) -> "
            f"{last['eval_reward']:.3f} (step {last['step']})"
        )
    print(f"vl-rl: outputs in {out.resolve()}")
    print(f"  final model: {(out / 'model').resolve()}")
    print(f"  metrics: {(out / 'metrics.jsonl').resolve()}")
    if result.plot is not None:
        print(f"  reward curve: {result.plot.resolve()}")
    if result.checkpoint is not None:
        print(f"  checkpoint: {result.checkpoint.resolve()}")
    return 0
