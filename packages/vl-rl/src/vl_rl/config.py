"""``RLConfig``: every knob of an RL run (rollouts, policy loss, sampling), on top of vl-train's run settings.

The optimiser and schedule are the ``optim`` section every trainer shares (:class:`vl_train.OptimConfig`,
the ``[optim]`` recipe section), and checkpoints, metrics, seed, steps and trainable parts are
:class:`vl_train.RunConfig`'s. The defaults follow Qwen3-VL's reasoning RL (SAPO, REFERENCE.md
section 5) scaled down to CPU-sized runs: 8 prompts per step with 8 responses each, two mini-batch
updates per rollout against the rollout's log-probabilities, AdamW at a constant rate after warm-up.

Needs ``vl-rl[train]`` (vl-train).

Notation: ``N`` prompts per step, ``G`` responses per prompt (``group_size``), ``T`` generated tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from vl_train.config import OptimConfig, RunConfig

__all__ = ["RLConfig"]

_METHODS = ("grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "sapo", "cispo")


@dataclass(kw_only=True)
class RLConfig(RunConfig):
    """Configuration of :class:`vl_rl.trainer.RLTrainer` (keyword-only; ``from_dict`` checks keys).

    The run settings (``trainable``, ``max_steps``, ``optim``, ``seed``, ``output_dir``, ``save_every``,
    ``keep_last``, ``max_nan_steps``, ``tensorboard``, ``plot``, ``progress``) are
    :class:`vl_train.RunConfig`'s; here ``trainable`` defaults to merger, DeepStack and LLM, ``max_steps``
    to 50, and ``optim`` to a constant rate (``min_lr_ratio=1``; an ``optim`` mapping updates that default, as a
    recipe's ``[optim]`` table does).

    Attributes:
        method: Policy loss of :func:`vl_rl.losses.policy_loss` (``sapo``, ``gspo``, ``grpo``, ...).
        group_size: ``G`` responses per prompt (1 gives zero advantages: no learning signal).
        prompts_per_step: ``N`` prompts per step (split over the ranks: a multiple of the world size).
        mini_batches: Updates per epoch; the ``N * G`` rows are split into this many parts.
        epochs: Passes over one rollout.
        max_new_tokens: Tokens per response before truncation.
        temperature: Sampling temperature of the rollouts (the log-probs use the same one).
        top_p: Nucleus sampling threshold of the rollouts.
        thinking: Force the thinking prompt (True), the non-thinking prompt (False) or follow each sample.
        force_answer: Close an unfinished ``<think>`` at truncation and generate an answer.
        answer_tokens: Extra tokens for a forced answer.
        clip_low: Lower ratio clip (None: the method's default).
        clip_high: Upper ratio clip (None: the method's default).
        tau_pos: SAPO temperature for positive advantages.
        tau_neg: SAPO temperature for negative advantages.
        kl_coef: Weight of the KL penalty to the reference model (needs ``ref_model``).
        kl_estimator: ``k1``, ``k2`` or ``k3``.
        advantage_scale: ``group``, ``batch`` or ``none`` (see :func:`vl_rl.advantages.group_advantages`).
        filter_solved: Drop prompts whose group pass rate exceeds this (Qwen3-VL: 0.9); None keeps all.
        dynamic_sampling: DAPO: resample until every group has mixed rewards (up to ``max_sample_rounds``).
        max_sample_rounds: Rounds of dynamic sampling before training on what was found.
        expansion_ema: GLM-4.5V's over-sampling for dynamic sampling: each round generates
            ``ceil(missing * ratio)`` groups, ratio the EMA (this smoothing) of 1 / (1 - share of all-equal
            groups) (:class:`~vl_rl.sampling.ExpansionRatio`); None asks for exactly the missing groups.
        pass_threshold: A response "passes" when its reward is at least this.
        prefilter_rollouts: Offline pass-rate filter before training (Qwen3-VL's reasoning data, REFERENCE.md
            section 5): this many rollouts of each prompt with the starting policy; 0 turns it off.
        prefilter_high: The filter drops prompts whose pass rate is above this (Qwen3-VL: 0.9).
        prefilter_drop_all_wrong: The filter also drops prompts no rollout solved.
        task_ratios: Mixed-task batches (Qwen3-VL): ``{task: weight}``, every step draws fixed per-task counts
            in these proportions (:class:`~vl_rl.sampling.MixedTaskBatcher`); every prompt's ``task`` needs a
            weight. None draws uniformly.
        rlcs: GLM-4.5V's curriculum sampling: prompts drawn by difficulty tier, tiers re-weighted every step
            from online pass rates (offline ones from the pre-filter when it ran;
            :class:`~vl_rl.curriculum.RLCSCurriculum`).
        rlcs_tiers: Tier boundaries on the pass rate, from 0.0 to 1.0.
        rlcs_ema: Smoothing of the online pass rates.
        rlcs_min_weight: Floor of a tier's weight (too-easy and too-hard tiers stay reachable).
        eval_every: Held-out evaluation every this many steps (0: only before and after).
        eval_max_new_tokens: Token budget of evaluation (None: ``max_new_tokens``).
        eval_greedy: Evaluate greedy responses (True) or sampled ones at ``temperature`` (the expected reward).
        eval_samples_per_prompt: Sampled responses per held-out prompt when not greedy.
        reward_timeout: Seconds before a reward call is abandoned (scored 0, counted as an error).
        rollout_batch_size: Rows per generate call.
        logprob_batch_size: Rows per forward when scoring old / reference log-probs.
    """

    trainable: tuple[str, ...] = ("merger", "deepstack", "llm")
    max_steps: int = 50
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(min_lr_ratio=1.0))
    output_dir: str = "runs/rl"
    tensorboard: bool = False
    method: str = "sapo"
    group_size: int = 8
    prompts_per_step: int = 8
    mini_batches: int = 2
    epochs: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    thinking: bool | None = None
    force_answer: bool = True
    answer_tokens: int = 16
    clip_low: float | None = None
    clip_high: float | None = None
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    advantage_scale: Literal["group", "batch", "none"] = "group"
    filter_solved: float | None = None
    dynamic_sampling: bool = False
    max_sample_rounds: int = 4
    expansion_ema: float | None = None
    pass_threshold: float = 1.0
    prefilter_rollouts: int = 0
    prefilter_high: float = 0.9
    prefilter_drop_all_wrong: bool = True
    task_ratios: dict[str, float] | None = None
    rlcs: bool = False
    rlcs_tiers: tuple[float, ...] = (0.0, 0.3, 0.7, 1.0)
    rlcs_ema: float = 0.9
    rlcs_min_weight: float = 0.05
    eval_every: int = 10
    eval_max_new_tokens: int | None = None
    eval_greedy: bool = True
    eval_samples_per_prompt: int = 4
    reward_timeout: float | None = 10.0
    rollout_batch_size: int = 64
    logprob_batch_size: int = 32

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.optim, Mapping):  # a partial [optim] table updates the RL defaults (a constant rate)
            self.optim = OptimConfig(min_lr_ratio=1.0).replace(**self.optim)
        try:
            super().__post_init__()
        except ValueError as exc:
            problems.append(str(exc))
        if self.method not in _METHODS:
            problems.append(f"method {self.method!r} is not one of {list(_METHODS)}")
        for name in (
            "group_size",
            "prompts_per_step",
            "mini_batches",
            "epochs",
            "max_new_tokens",
            "eval_samples_per_prompt",
            "rollout_batch_size",
            "logprob_batch_size",
        ):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "answer_tokens", "prefilter_rollouts"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            problems.append(f"need temperature > 0, 0 < top_p <= 1; got {self.temperature}, {self.top_p}")
        if self.mini_batches > self.prompts_per_step * self.group_size:
            problems.append(f"mini_batches ({self.mini_batches}) exceeds the rows per step (N * G)")
        if self.filter_solved is not None and not 0.0 <= self.filter_solved <= 1.0:
            problems.append(f"filter_solved must lie in [0, 1] or be None, got {self.filter_solved}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            problems.append(f"kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        if self.advantage_scale not in ("group", "batch", "none"):
            problems.append(f"advantage_scale must be group, batch or none, got {self.advantage_scale!r}")
        problems += self._curriculum_problems()
        if problems:
            raise ValueError("invalid RLConfig: " + "; ".join(problems))

    def _curriculum_problems(self) -> list[str]:
        problems = []
        if self.expansion_ema is not None and not (self.dynamic_sampling and 0.0 <= self.expansion_ema < 1.0):
            problems.append(f"expansion_ema must lie in [0, 1) and needs dynamic_sampling, got {self.expansion_ema}")
        if not 0.0 <= self.prefilter_high <= 1.0:
            problems.append(f"prefilter_high must lie in [0, 1], got {self.prefilter_high}")
        if self.prefilter_rollouts == 1:
            problems.append("prefilter_rollouts = 1 cannot tell a learnable prompt apart (pass rates 0 or 1): use >= 2")
        if self.task_ratios is not None:
            self.task_ratios = {str(k): float(v) for k, v in self.task_ratios.items()}
            if not self.task_ratios or any(not v >= 0 for v in self.task_ratios.values()):
                problems.append(f"task_ratios must map tasks to weights >= 0, got {self.task_ratios}")
            elif not sum(self.task_ratios.values()) > 0:
                problems.append(f"task_ratios must not all be 0, got {self.task_ratios}")
            if self.rlcs:
                problems.append("task_ratios and rlcs both choose the prompts of a step: set one of them")
        self.rlcs_tiers = tuple(float(b) for b in self.rlcs_tiers)
        tiers = self.rlcs_tiers
        if len(tiers) < 2 or tiers[0] != 0.0 or tiers[-1] != 1.0 or any(b >= c for b, c in itertools.pairwise(tiers)):
            problems.append(f"rlcs_tiers must rise strictly from 0.0 to 1.0, got {list(tiers)}")
        if not 0.0 <= self.rlcs_ema < 1.0 or not 0.0 < self.rlcs_min_weight <= 1.0:
            problems.append(
                f"need 0 <= rlcs_ema < 1 and 0 < rlcs_min_weight <= 1, got {self.rlcs_ema} and {self.rlcs_min_weight}"
            )
        return problems
