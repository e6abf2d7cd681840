"""The adapter-transfer recipe (Skywork-R1V style), stage by stage, for one seed; and its pretrained parts.

:func:`build_parts` makes the three "checkpoints" the recipe starts from (``at_models``): the V0
tower, the instruct LLM (text view of the tasks) and the reasoning LLM (re-expressed in the reasoning
tokenizer, fine-tuned with reasoning traces). :func:`run_seed` then runs, from copies of them:

- **baseline**: the reasoning LLM with a fresh adapter (what the swapped LLM knows without one);
- **A**: tower + instruct LLM, only the adapter (merger and DeepStack mergers) trains; tower and LLM
  are checked bit-identical afterwards;
- **B**: the reasoning LLM swapped in (``at_models.swap_checked``: ids re-mapped and checked), no training;
- **C**: hybrid SFT on all the training data (a ``thinking`` share of the answers with their reasoning);
- **D**: filtered SFT on the training items the model after C answers wrong (scored by the verifier);
- **E**: GRPO (``vl_rl.RLTrainer``) with the verifier as reward.

B to E train the adapter only; the tower and the reasoning LLM are checked bit-identical at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from at_eval import TASKS, evaluate_images, evaluate_text, heldout_samples
from at_models import (
    CellNoise,
    ModelSpec,
    changed_parameters,
    compose_cell_embeddings,
    fingerprint,
    fresh_adapter,
    new_language_model,
    new_tower,
    pretrain_vision_tower,
    swap_checked,
    vision_ids,
)
from at_stages import GRPOSpec, SFTSpec, StageRun, run_grpo, score_items, synthetic_sources, train_sft, wrong_items
from at_tokens import make_processor, make_tokenizer, transfer_language_model

from vl_model import compose
from vl_train.data import SyntheticDataset

__all__ = [
    "ADAPTER",
    "STAGES",
    "Parts",
    "RecipeSettings",
    "SeedResult",
    "build_parts",
    "heldout_set",
    "load_parts",
    "parts_key",
    "run_seed",
    "save_parts",
]

ADAPTER = ("merger", "deepstack")
"""The parts the recipe trains: the MLP merger and the DeepStack mergers."""

STAGES = ("baseline", "A", "B", "C", "D", "E")
"""The evaluations of one seed, in order."""


@dataclass
class RecipeSettings:
    """Every setting of the example (``--smoke`` shrinks them; see ``run.py``).

    Attributes:
        model: Sizes of the parts and the scenes.
        tasks: Task -> sampling weight of the supervised mixtures (a run's own ``tasks`` replace it). ``cells``
            (name every cell, ``at_cells.CellListing``) is alignment data: it supervises every visual token,
            where a question supervises one answer token.
        eval_tasks: The tasks scored on held-out samples, scored for filtered SFT and used as GRPO prompts.
        data_size: Training samples per task source.
        instruct: Text pretraining of the instruct LLM.
        reasoning: Fine-tuning of the reasoning LLM (text view, reasoning on a share of the answers).
        stage_a: Stage A (adapter on the instruct LLM).
        stage_c: Stage C (hybrid SFT, adapter only).
        stage_d: Stage D (filtered SFT, adapter only).
        cell_noise: Noise on the cell embeddings during both LLMs' text training (``at_models.CellNoise``).
        filter_pool: Training items per task scored after C; the wrong ones are D's data.
        grpo: Stage E.
        eval_size: Held-out samples per task.
        max_new_tokens: Tokens per evaluated answer.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    tasks: dict[str, float] = field(default_factory=lambda: {"count": 3.0, "colour": 2.0, "compare": 1.0, "cells": 1.0})
    eval_tasks: tuple[str, ...] = TASKS
    data_size: int = 20000
    instruct: SFTSpec = field(
        default_factory=lambda: SFTSpec("instruct_llm", 1500, 1e-3, ("llm",), text_view=True, warmup_steps=20)
    )
    reasoning: SFTSpec = field(
        default_factory=lambda: SFTSpec("reasoning_llm", 200, 3e-4, ("llm",), thinking=0.5, text_view=True)
    )
    stage_a: SFTSpec = field(
        default_factory=lambda: SFTSpec(
            "A_adapter", 500, 2e-3, ADAPTER, tasks={"cells": 3.0, "count": 3.0, "colour": 2.0, "compare": 1.0}
        )
    )
    stage_c: SFTSpec = field(default_factory=lambda: SFTSpec("C_hybrid_sft", 200, 5e-4, ADAPTER, thinking=0.3))
    stage_d: SFTSpec = field(default_factory=lambda: SFTSpec("D_filtered_sft", 60, 1e-4, ADAPTER, thinking=0.3))
    cell_noise: float = 0.3
    filter_pool: int = 200
    grpo: GRPOSpec = field(default_factory=GRPOSpec)
    eval_size: int = 100
    max_new_tokens: int = 8


@dataclass
class Parts:
    """The pretrained parts the recipe starts from, and what building them measured.

    Attributes:
        tower: The V0 tower (its merger is replaced by a fresh adapter in every composed model).
        instruct_lm: The instruct LLM (instruct tokenizer).
        reasoning_lm: The reasoning LLM (reasoning tokenizer).
        instruct_processor: Processor with the instruct tokenizer.
        reasoning_processor: Processor with the reasoning tokenizer.
        ceilings: Text-view held-out accuracy of each LLM (``"instruct"``, ``"reasoning"``).
        seconds: Wall time of each part's training.
    """

    tower: Any
    instruct_lm: Any
    reasoning_lm: Any
    instruct_processor: Any
    reasoning_processor: Any
    ceilings: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def parts_key(settings: RecipeSettings) -> dict[str, Any]:
    """The settings the pretrained parts depend on (a saved set of parts is reused only when they match)."""
    fields: tuple[str, ...] = ("model", "tasks", "eval_tasks", "data_size", "instruct", "reasoning")
    fields += ("cell_noise", "eval_size", "max_new_tokens")
    return json.loads(json.dumps({f: dataclasses.asdict(settings)[f] for f in fields}, default=str))


def save_parts(parts: Parts, settings: RecipeSettings, path: Path) -> None:
    """Write the parts' weights, configs, ceilings and times to ``path`` (one ``torch.save`` file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "key": parts_key(settings),
            "tower": parts.tower.state_dict(),
            "instruct": (parts.instruct_lm.config.to_dict(), parts.instruct_lm.state_dict()),
            "reasoning": (parts.reasoning_lm.config.to_dict(), parts.reasoning_lm.state_dict()),
            "ceilings": parts.ceilings,
            "seconds": parts.seconds,
        },
        path,
    )


def load_parts(settings: RecipeSettings, path: Path) -> Parts:
    """The parts saved in ``path`` by :func:`save_parts`.

    Raises:
        ValueError: They were built with other settings (the differing ones named).
    """
    from transformers import AutoModelForCausalLM, Qwen3Config

    saved = torch.load(path, weights_only=True)
    want = parts_key(settings)
    differ = sorted(k for k in want if saved["key"].get(k) != want[k])
    if differ:
        raise ValueError(
            f"the parts in {path} were built with other settings ({differ}): delete the file or pass another --parts"
        )
    spec = settings.model
    instruct_tok, reasoning_tok = make_tokenizer("instruct"), make_tokenizer("reasoning")
    patch = int(spec.vision["patch_size"])
    tower = new_tower(spec, seed=0)
    tower.load_state_dict(saved["tower"])
    lms = []
    for name in ("instruct", "reasoning"):
        config, state = saved[name]
        lm = AutoModelForCausalLM.from_config(Qwen3Config.from_dict(config))
        lm.load_state_dict(state)
        lm.generation_config.eos_token_id, lm.generation_config.pad_token_id = (
            lm.config.eos_token_id,
            lm.config.pad_token_id,
        )
        lms.append(lm.eval())
    return Parts(
        tower,
        lms[0],
        lms[1],
        make_processor(instruct_tok, patch_size=patch, max_pixels=spec.max_pixels),
        make_processor(reasoning_tok, patch_size=patch, max_pixels=spec.max_pixels),
        ceilings=saved["ceilings"],
        seconds=saved["seconds"],
    )


def _composed(tower: Any, lm: Any, processor: Any) -> Any:
    return compose(copy.deepcopy(tower), copy.deepcopy(lm), **vision_ids(processor.tokenizer))


def build_parts(settings: RecipeSettings, heldout: list[dict[str, Any]], output_dir: Path, *, progress: bool) -> Parts:
    """Pretrain the tower (V0) and the two LLMs (see the module docstring); seed 0 for all of them."""
    spec = settings.model
    instruct_tok, reasoning_tok = make_tokenizer("instruct"), make_tokenizer("reasoning")
    patch = int(spec.vision["patch_size"])
    instruct_proc = make_processor(instruct_tok, patch_size=patch, max_pixels=spec.max_pixels)
    reasoning_proc = make_processor(reasoning_tok, patch_size=patch, max_pixels=spec.max_pixels)
    seconds: dict[str, float] = {}

    tower = new_tower(spec, seed=0)
    seconds["V0 tower"], _ = pretrain_vision_tower(
        tower, instruct_proc, spec, output_dir / "V0", seed=0, progress=progress
    )

    lm = new_language_model(spec, instruct_tok, seed=0)
    compose_cell_embeddings(lm, instruct_tok)
    host = compose(tower, lm, **vision_ids(instruct_tok))  # the LLM trains inside it, on text only
    sources, ratios = synthetic_sources(
        settings.instruct.tasks or settings.tasks, spec, size=settings.data_size, seed=1, thinking=0.0
    )
    with CellNoise(lm, instruct_tok, settings.cell_noise, seed=0):
        run = train_sft(
            host, instruct_proc, sources, ratios, settings.instruct, spec.grid, output_dir, seed=0, progress=progress
        )
    seconds["instruct LLM (text view)"] = run.seconds

    reasoning = transfer_language_model(lm, instruct_tok, reasoning_tok)
    host = compose(tower, reasoning, **vision_ids(reasoning_tok))
    sources, ratios = synthetic_sources(
        settings.reasoning.tasks or settings.tasks,
        spec,
        size=settings.data_size,
        seed=2,
        thinking=settings.reasoning.thinking,
    )
    with CellNoise(reasoning, reasoning_tok, settings.cell_noise, seed=1):
        run = train_sft(
            host, reasoning_proc, sources, ratios, settings.reasoning, spec.grid, output_dir, seed=0, progress=progress
        )
    seconds["reasoning LLM (text view)"] = run.seconds

    parts = Parts(tower, lm, reasoning, instruct_proc, reasoning_proc, seconds=seconds)
    for name, model_lm, proc in (("instruct", lm, instruct_proc), ("reasoning", reasoning, reasoning_proc)):
        composed = _composed(tower, model_lm, proc)
        parts.ceilings[name] = evaluate_text(composed, proc, heldout, spec.grid, max_new_tokens=settings.max_new_tokens)
    return parts


@dataclass
class SeedResult:
    """One seed's run of the recipe.

    Attributes:
        seed: The seed (adapter init, data order, RL sampling).
        scores: Stage (:data:`STAGES`) -> held-out accuracy per task.
        seconds: Stage -> training wall time; ``"eval"`` the evaluations together.
        remapped: Field -> ``(instruct id, reasoning id)`` of every re-mapped token id.
        filtered: Training items scored after C, and how many were wrong (D's data).
        rewards: Mean training reward per GRPO step.
    """

    seed: int
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    remapped: dict[str, tuple[int, int]] = field(default_factory=dict)
    filtered: tuple[int, int] = (0, 0)
    rewards: list[float] = field(default_factory=list)


def _check_frozen(before: dict[str, str], model: Any, parts: tuple[str, ...], when: str) -> None:
    changed = changed_parameters(before, model, parts)
    if changed:
        raise RuntimeError(f"{when}: frozen parameters changed: {changed[:5]} ({len(changed)} in all)")


def run_seed(
    parts: Parts,
    settings: RecipeSettings,
    heldout: list[dict[str, Any]],
    seed: int,
    output_dir: Path,
    *,
    progress: bool,
    log: Callable[[str], None] = print,
) -> SeedResult:
    """Baseline and stages A to E for one seed (see the module docstring); the parts are left untouched.

    Raises:
        RuntimeError: A frozen part (tower, LLM) changed during a stage.
    """
    spec, out, result = settings.model, output_dir / f"seed{seed}", SeedResult(seed)
    eval_time = [0.0]

    def evaluate(stage: str, model: Any, processor: Any) -> None:
        start = time.perf_counter()
        scores = evaluate_images(
            model, processor, heldout, max_new_tokens=settings.max_new_tokens, progress=progress, desc=f"eval {stage}"
        )
        eval_time[0] += time.perf_counter() - start
        result.scores[stage] = scores
        log(f"seed {seed}: {stage}: " + ", ".join(f"{t} {100 * scores[t]:.0f}%" for t in settings.eval_tasks))

    def sft(model: Any, processor: Any, sources: Any, ratios: Any, run: SFTSpec) -> StageRun:
        done = train_sft(model, processor, sources, ratios, run, spec.grid, out, seed=seed, progress=progress)
        result.seconds[run.name] = done.seconds
        return done

    baseline = _composed(parts.tower, parts.reasoning_lm, parts.reasoning_processor)
    fresh_adapter(baseline.visual, seed)
    evaluate("baseline", baseline, parts.reasoning_processor)
    del baseline

    model = _composed(parts.tower, parts.instruct_lm, parts.instruct_processor)
    fresh_adapter(model.visual, seed)
    frozen = fingerprint(model, ("vision", "llm"))
    sources, ratios = synthetic_sources(
        settings.stage_a.tasks or settings.tasks, spec, size=settings.data_size, seed=100 + seed, thinking=0.0
    )
    sft(model, parts.instruct_processor, sources, ratios, settings.stage_a)
    _check_frozen(frozen, model, ("vision", "llm"), "stage A")
    evaluate("A", model, parts.instruct_processor)

    processor = parts.reasoning_processor
    result.remapped = swap_checked(model, copy.deepcopy(parts.reasoning_lm), processor)
    frozen = fingerprint(model, ("vision", "llm"))
    evaluate("B", model, processor)

    thinking = settings.stage_c.thinking
    sources, ratios = synthetic_sources(
        settings.stage_c.tasks or settings.tasks, spec, size=settings.data_size, seed=200 + seed, thinking=thinking
    )
    sft(model, processor, sources, ratios, settings.stage_c)
    evaluate("C", model, processor)

    pool = [
        s
        for task in settings.eval_tasks
        for s in SyntheticDataset(
            "train",
            size=settings.filter_pool,
            seed=300 + seed,
            tasks=[task],
            image_size_range=spec.image_size_range,
            thinking=settings.stage_d.thinking,
            grid=spec.grid,
        )
    ]
    start = time.perf_counter()
    wrong = wrong_items(pool, score_items(model, processor, pool, max_new_tokens=settings.max_new_tokens))
    result.seconds["D scoring"] = time.perf_counter() - start
    result.filtered = (len(pool), len(wrong))
    log(f"seed {seed}: D: {len(wrong)} of {len(pool)} training items answered wrong after C")
    if wrong:
        sft(model, processor, {"wrong": wrong}, {"wrong": 1.0}, settings.stage_d)
    evaluate("D", model, processor)

    prompts = [
        s
        for task in settings.eval_tasks
        for s in SyntheticDataset(
            "train",
            size=500,
            seed=400 + seed,
            tasks=[task],
            image_size_range=spec.image_size_range,
            thinking=0.0,
            grid=spec.grid,
        )
    ]
    rl = run_grpo(model, processor, prompts, settings.grpo, out, seed=seed, progress=progress)
    result.seconds["E_grpo"], result.rewards = rl.seconds, rl.losses
    evaluate("E", model, processor)
    _check_frozen(frozen, model, ("vision", "llm"), "stages C to E")
    result.seconds["eval"] = eval_time[0]
    return result


def heldout_set(settings: RecipeSettings) -> list[dict[str, Any]]:
    """The held-out samples every evaluation uses (``eval_size`` per task, seed 0)."""
    return heldout_samples(settings.eval_tasks, settings.eval_size, 0, settings.model)
