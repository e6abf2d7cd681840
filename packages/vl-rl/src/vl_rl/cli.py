"""``vl-rl``: run an RL recipe (TOML) on your prompts with your reward, from any checkpoint.

Usage::

    vl-rl qwen3_vl_rl --init-from checkpoints/Qwen3-VL-2B-Instruct --set data.path=data/rl.jsonl
    vl-rl my_rl.toml --set rl.max_steps=200 --output runs/rl      # a recipe file with overrides
    vl-rl my_rl.toml --output runs/rl --resume                     # continue a stopped run
    vl-rl my_rl.toml --dry-run                                     # check every section, train nothing
    vl-rl --list                                                   # packaged recipes
    torchrun --nproc-per-node 8 -m vl_rl my_rl.toml --output runs/rl   # FSDP2 over 8 GPUs

Recipe sections (every key is checked; an unknown one is an error naming it and listing the known ones):

- ``[model]``: vl-train's (:mod:`vl_train.builders`): ``init_from`` (an official Qwen3-VL checkpoint, ours,
  a composed one, or a previous run's output; its own processor comes with it) or a fresh model's configs.
- ``[data]``: the prompts (:mod:`vl_rl.prompt_data`): ``kind = "jsonl" | "hf" | "synthetic"``, ``path``,
  ``heldout_path`` / ``heldout_split``, ``heldout_size``, ``policy``.
- ``[reward]``: the reward (:mod:`vl_rl.reward_spec`): ``verifier``, ``function = "module:callable"`` or a
  ``[reward.judge]`` table, weighted terms, ``[reward.tasks.NAME]`` per task. Synthetic prompts default to
  their own verifier.
- ``[rl]``: :class:`~vl_rl.config.RLConfig` fields, the papers' pipelines among them: ``prefilter_rollouts``
  (offline pass-rate filter), ``task_ratios`` (mixed-task batches), ``rlcs`` (curriculum tiers),
  ``dynamic_sampling`` with ``expansion_ema``. ``[optim]``: the optimiser (:class:`vl_train.OptimConfig`).

``--set section.key=value`` parses ``value`` as TOML (``1e-4``, ``true``, ``[1, 2]``), else as a string.
The run writes ``metrics.jsonl``, checkpoints, ``reward_curve.png``, ``prefilter/`` when filtering, and the
final model as ``OUTPUT/model`` in the layout it came in (an official checkpoint stays official). Ctrl-C
finishes the step, writes a checkpoint and exits with status 130, printing the command that resumes. The
policy trains on GPU ``LOCAL_RANK`` when CUDA is available, else on the CPU; with ``kl_coef > 0`` the KL
reference is a frozen copy of the starting policy.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vl_train import recipe as train_recipe

from .config import RLConfig
from .prompt_data import PromptData, check_data_section, load_prompts
from .reward_spec import REWARD_TYPES, RecipeReward, build_reward

__all__ = ["RecipeRun", "build_reward", "load_recipe", "main", "packaged_recipes", "resolve_config", "run_recipe"]

_TOP = {"description", "model", "data", "optim", "rl", "reward"}


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped in ``vl_rl/recipes`` (and the demo ones in ``vl_rl/testing/recipes``)."""
    return train_recipe.packaged_recipes("vl_rl")


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe file, or a packaged recipe by name (``"qwen3_vl_rl"`` or ``"qwen3_vl_rl.toml"``).

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
    train_recipe.check_keys("[model]", recipe.get("model", {}), train_recipe.MODEL_TYPES)
    check_data_section(recipe.get("data", {}))
    train_recipe.check_keys("[reward]", recipe.get("reward", {}), REWARD_TYPES)
    rl = dict(recipe.get("rl", {}))
    train_recipe.check_no_optim_keys("[rl]", rl)
    if output is not None:
        rl["output_dir"] = output
    if recipe.get("optim"):
        rl["optim"] = RLConfig().optim.replace(**dict(recipe["optim"]))
    return RLConfig.from_dict(rl)


def _judge_timeouts(section: Mapping[str, Any], limit: float | None) -> dict[str, Any]:
    """``[reward]`` with every judge bounded by the run's ``reward_timeout`` (its default ``timeout_s``).

    The trainer abandons a reward call after ``reward_timeout`` seconds; a judge allowed longer would keep
    calling in the background after its score was already counted as 0.
    """
    out = dict(section)
    tasks = {name: dict(t) if isinstance(t, Mapping) else t for name, t in dict(out.get("tasks", {})).items()}
    if tasks:
        out["tasks"] = tasks
    scopes = [("[reward.judge]", out)]
    scopes += [(f"[reward.tasks.{name}.judge]", t) for name, t in tasks.items() if isinstance(t, dict)]
    for where, scope in scopes:
        judge = scope.get("judge")
        if not isinstance(judge, Mapping) or limit is None:
            continue
        timeout = float(judge.get("timeout_s", limit))
        if timeout > limit:
            raise ValueError(
                f"{where} timeout_s = {timeout:g} exceeds [rl] reward_timeout = {limit:g}: the run would give up on "
                "the judge first; lower timeout_s or raise reward_timeout"
            )
        scope["judge"] = {**judge, "timeout_s": timeout}
    return out


def recipe_reward(recipe: Mapping[str, Any], config: RLConfig, tokenizer: Any = None) -> RecipeReward:
    """The ``[reward]`` of a recipe (synthetic prompts default to their own verifier; judges are bounded by the
    run's ``reward_timeout``)."""
    synthetic = recipe.get("data", {}).get("kind", "synthetic") == "synthetic"
    return build_reward(
        _judge_timeouts(recipe.get("reward", {}), config.reward_timeout),
        tokenizer=tokenizer,
        max_new_tokens=config.max_new_tokens,
        default_verifier="synthetic" if synthetic else None,
    )


@dataclass
class RecipeRun:
    """What :func:`run_recipe` did.

    Attributes:
        result: The trainer's :class:`~vl_rl.trainer.RLResult`.
        model: The trained policy (saved as ``OUTPUT/model`` unless the run was interrupted).
        processor: Its processor.
        data: The prompts and their counts.
        reward: The reward.
        resumed_from: The checkpoint the run continued from (None: a fresh start).
    """

    result: Any
    model: Any
    processor: Any
    data: PromptData
    reward: RecipeReward
    resumed_from: Any = None

    @property
    def interrupted(self) -> bool:
        """Whether Ctrl-C / SIGTERM stopped the run (its checkpoint was written; the model was not saved)."""
        return str(self.result.stopped_reason).startswith("interrupted")


def run_recipe(
    recipe: Mapping[str, Any],
    *,
    output: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], object] = print,
) -> RecipeRun:
    """Build everything a recipe describes, train, and save the final model (what ``vl-rl`` runs).

    Args:
        recipe: The recipe (overrides applied).
        output: Output folder (overrides ``rl.output_dir``).
        resume: Continue from the newest valid checkpoint in the output folder.
        overwrite: Start afresh in an output folder that holds another run (deleting it).
        log: Where progress lines go.

    Raises:
        ValueError: A bad recipe, a prompt the policy fails on, an output folder holding another run.
        FileNotFoundError: A checkpoint or data file that does not exist.
    """
    from vl_train.builders import build_model, save_final_model
    from vl_train.parallel import training_device

    from .trainer import RLTrainer

    config = resolve_config(recipe, output)
    model, processor = build_model(recipe.get("model", {}))
    model.to(training_device())
    # the KL penalty's reference is the starting policy, frozen (as TRL builds it when beta > 0)
    ref_model = copy.deepcopy(model) if config.kl_coef > 0 else None
    reward = recipe_reward(recipe, config, processor.tokenizer)
    data = load_prompts(recipe.get("data", {}), reward)
    log(f"vl-rl: reward {reward.description}")
    stats = data.stats
    log("vl-rl: data: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.counts.items())))
    for event in sorted(set(stats.counts) - {"prompts", "heldout_prompts"}):
        log(f"vl-rl: {event} {stats.counts[event]}:" + "".join(f"\n  - {m}" for m in stats.examples.get(event, [])))
    trainer = RLTrainer(
        model,
        processor,
        config,
        data.train,
        reward,
        eval_samples=data.heldout or None,
        ref_model=ref_model,
        resume=resume,
        overwrite=overwrite,
    )
    if trainer.resumed_from is not None:
        log(f"vl-rl: resumed from {trainer.resumed_from} at step {trainer.step}")
    log(f"vl-rl: {config.method}, {sum(p.numel() for p in model.parameters())} parameters, {len(data.train)} prompts")
    result = trainer.train()
    run = RecipeRun(result, model, processor, data, reward, trainer.resumed_from)
    if not run.interrupted:
        save_final_model(model, processor, recipe.get("model", {}), result.output_dir)
    return run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vl-rl", description="Run a vl-rl TOML recipe.")
    parser.add_argument("recipe", nargs="?", help="a recipe file or a packaged recipe name")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--output", help="output folder (overrides rl.output_dir)")
    parser.add_argument("--init-from", help="start from this model folder or a previous run's output")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output")
    parser.add_argument(
        "--overwrite", action="store_true", help="start afresh in an output folder that holds a run (deletes it)"
    )
    parser.add_argument("--dry-run", action="store_true", help="check the recipe and print the config, no training")
    parser.add_argument("--list", action="store_true", help="list the packaged recipes")
    return parser


def _report(run: RecipeRun) -> None:
    result = run.result
    out = result.output_dir
    print(f"vl-rl: stopped after {result.steps} steps ({result.stopped_reason})")
    if result.prefilter is not None:
        stats = result.prefilter.stats
        print(
            f"vl-rl: pass-rate filter kept {int(stats['kept'])} of {int(stats['total'])} prompts "
            f"({int(stats['too_easy'])} too easy, {int(stats['all_wrong'])} never solved): {out / 'prefilter'}"
        )
    if result.eval_history:
        first, last = result.eval_history[0], result.eval_history[-1]
        print(
            f"vl-rl: held-out reward {first['eval_reward']:.3f} (step {first['step']}) -> "
            f"{last['eval_reward']:.3f} (step {last['step']})"
        )
    if result.warning:
        print(f"vl-rl: warning: {result.warning}", file=sys.stderr)
    print(f"vl-rl: outputs in {out.resolve()}")
    print(f"  final model: {(out / 'model').resolve()}")
    print(f"  metrics: {(out / 'metrics.jsonl').resolve()}")
    if result.plot is not None:
        print(f"  reward curve: {result.plot.resolve()}")
    if result.checkpoint is not None:
        print(f"  checkpoint: {result.checkpoint.resolve()}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vl-rl`` / ``python -m vl_rl``; returns the exit status (2: bad input, 130: interrupted).

    Under ``torchrun`` every rank runs it: the ranks join the process group, shard the policy with FSDP2 and
    split each step's prompts; rank 0 prints and writes.
    """
    from vl_train.parallel import run_launched

    args = _parser().parse_args(argv)
    if args.list:
        print("packaged recipes:", ", ".join(packaged_recipes()))
        return 0
    if not args.recipe:
        _parser().print_usage(sys.stderr)
        return 2
    return run_launched("vl-rl", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from vl_train.parallel import is_main_process
    from vl_train.recipe import apply_overrides

    main_rank = is_main_process()
    try:
        recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
        if args.init_from:
            recipe.setdefault("model", {})["init_from"] = args.init_from
        config = resolve_config(recipe, args.output)
        if args.dry_run:
            reward = recipe_reward(recipe, config)
            if main_rank:
                print(f"vl-rl: recipe {args.recipe} is valid (model and data not loaded); reward {reward.description}")
                print(f"vl-rl: config: {config.to_dict()}")
            return 0
        log = print if main_rank else (lambda line: None)
        run = run_recipe(recipe, output=args.output, resume=args.resume, overwrite=args.overwrite, log=log)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vl-rl: error: {exc}", file=sys.stderr)
        return 2
    if run.interrupted:
        result = run.result
        command = ["vl-rl", args.recipe, *(["--init-from", args.init_from] if args.init_from else [])]
        command += ["--output", str(result.output_dir), "--resume", *(x for s in args.overrides for x in ("--set", s))]
        if main_rank:
            print(
                f"vl-rl: {result.stopped_reason} at step {result.steps}: checkpoint {result.checkpoint}; continue "
                f"with `{shlex.join(command)}`",
                file=sys.stderr,
            )
        return 130
    if main_rank:
        _report(run)
    return 0
