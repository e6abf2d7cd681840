"""``RLTrainer``: rollouts, verifiable rewards, group advantages, then mini-batch policy updates.

Implements one RL step of Qwen3-VL's reasoning RL (REFERENCE.md section 5), with the pieces of this
package and of vl-train:

1. draw ``N`` prompts (seeded per step, so a resumed run draws the same ones);
2. roll out ``G`` responses each (:class:`~vl_rl.rollout.HFRolloutEngine` or any ``RolloutEngine``);
3. score them with the reward wrapped in :class:`~vl_rl.rewards.SafeReward` (errors and timeouts
   score 0 and are counted); optionally drop groups solved more often than ``filter_solved``
   (Qwen3-VL: 0.9), or resample until every group has mixed rewards (DAPO dynamic sampling,
   :class:`~vl_rl.sampling.DynamicSampler`);
4. :func:`~vl_rl.advantages.group_advantages` (zeros for ``G = 1`` and for all-equal groups);
5. old log-probs of the rollout policy (and of ``ref_model`` when ``kl_coef > 0``), without gradients;
6. ``epochs x mini_batches`` AdamW updates of :func:`~vl_rl.losses.policy_loss` against the old
   log-probs, with gradient clipping; the learning-rate schedule (:mod:`vl_train.optim`) advances
   once per RL step.

Metrics go to ``metrics.jsonl`` (and TensorBoard) through :class:`vl_train.metrics.MetricsLogger`;
checkpoints are written atomically by :mod:`vl_train.checkpoint` and ``resume=True`` continues exactly
(same prompts, responses and weights as an uninterrupted run). Held-out evaluation runs before
training, every ``eval_every`` steps and at the end; ``reward_curve.png`` plots train and held-out
rewards.

Notation: ``N`` prompts per step, ``G`` responses per prompt, ``R = N * G`` rows, ``T`` completion tokens.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .advantages import group_advantages
from .config import RLConfig
from .evaluate import EvalResult, SampleReward, evaluate, prompt_of, sample_reward
from .losses import policy_loss
from .rewards import SafeReward
from .rollout import (
    HFRolloutEngine,
    Rollout,
    RolloutEngine,
    concat_rollouts,
    rollout_logprobs,
    select_rows,
    subset_groups,
)
from .sampling import DynamicSampler

__all__ = ["REWARD_PLOT", "RLResult", "RLTrainer", "plot_reward_curve"]

REWARD_PLOT = "reward_curve.png"
Callback = Callable[["RLTrainer", int, dict[str, Any]], None]


@dataclass
class RLResult:
    """What :meth:`RLTrainer.train` did.

    Attributes:
        steps: RL steps done (including those of a resumed run).
        records: Per-step metric records.
        eval_history: ``{"step", "eval_reward", "eval_reward/<task>"}`` per evaluation.
        output_dir: The run's folder.
        plot: The reward-curve PNG (None without matplotlib or with ``plot=False``).
        checkpoint: The last checkpoint written.
    """

    steps: int
    records: list[dict[str, Any]]
    eval_history: list[dict[str, Any]]
    output_dir: Path
    plot: Path | None
    checkpoint: Path | None


def plot_reward_curve(
    records: Sequence[dict[str, Any]], eval_history: Sequence[dict[str, Any]], path: str | Path
) -> Path | None:
    """Train reward per step and held-out reward per evaluation; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["reward_mean"]) for r in records if isinstance(r.get("reward_mean"), float)]
    if train:
        ax.plot(*zip(*train, strict=True), label="train reward (sampled)", alpha=0.7)
    held = [(e["step"], e["eval_reward"]) for e in eval_history]
    if held:
        ax.plot(*zip(*held, strict=True), marker="o", label="held-out reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class RLTrainer:
    """Trains a policy with verifiable rewards (see the module docstring).

    Args:
        model: The policy (a :class:`vl_model.VLForConditionalGeneration`).
        processor: Its processor.
        config: The run's :class:`~vl_rl.config.RLConfig`.
        train_samples: Prompts to draw from (suite samples with ``messages``; answers for the reward).
        reward_fn: ``reward_fn(sample, response) -> float`` (or a :class:`~vl_rl.rewards.SafeReward`).
        eval_samples: Held-out samples for :meth:`evaluate` (None: no evaluation).
        ref_model: Frozen reference policy for the KL penalty (needed when ``kl_coef > 0``).
        engine: Rollout engine (default: an :class:`~vl_rl.rollout.HFRolloutEngine` from the config).
        callbacks: ``callback(trainer, step, record)`` after every step.
        resume: Continue from the latest checkpoint in ``output_dir`` (a fresh start when there is none).

    Raises:
        ValueError: No training samples, or ``kl_coef > 0`` without a reference model.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        config: RLConfig,
        train_samples: Sequence[dict[str, Any]],
        reward_fn: SampleReward | SafeReward,
        *,
        eval_samples: Sequence[dict[str, Any]] | None = None,
        ref_model: nn.Module | None = None,
        engine: RolloutEngine | None = None,
        callbacks: Sequence[Callback] = (),
        resume: bool = False,
    ) -> None:
        from vl_model.parts import PARTS, freeze, unfreeze
        from vl_train.config import TrainConfig
        from vl_train.optim import build_optimizer, build_scheduler

        if len(train_samples) == 0:
            raise ValueError("RLTrainer needs at least one training sample")
        if config.kl_coef > 0 and ref_model is None:
            raise ValueError(f"kl_coef={config.kl_coef} needs a ref_model (or set kl_coef=0)")
        self.model, self.processor, self.config = model, processor, config
        self.train_samples, self.eval_samples = list(train_samples), list(eval_samples or [])
        self.reward = sample_reward(reward_fn, config.reward_timeout)
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
        self.callbacks, self.resume = list(callbacks), resume
        freeze(model, [p for p in PARTS if p not in config.trainable])
        unfreeze(model, config.trainable)
        opt_config = TrainConfig(
            trainable=config.trainable,
            lr=config.lr,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_steps,
            max_steps=config.max_steps,
            min_lr_ratio=config.min_lr_ratio,
            max_grad_norm=config.max_grad_norm,
        )
        self.optimizer = build_optimizer(model, opt_config)
        self.scheduler = build_scheduler(self.optimizer, opt_config)
        self.engine: RolloutEngine = engine or HFRolloutEngine(
            model,
            processor,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            thinking=config.thinking,
            force_answer=config.force_answer,
            answer_tokens=config.answer_tokens,
            batch_size=config.rollout_batch_size,
        )
        self.pad_id = int(processor.tokenizer.pad_token_id)

    # ------------------------------------------------------------------ pieces of a step

    def _draw(self, step: int, round_: int, n: int) -> list[dict[str, Any]]:
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step * 101 + round_)
        order = torch.randperm(len(self.train_samples), generator=gen).tolist()
        while len(order) < n:  # fewer samples than prompts per step: draw with repeats
            order += torch.randperm(len(self.train_samples), generator=gen).tolist()
        return [self.train_samples[i] for i in order[:n]]

    def score(self, rollout: Rollout) -> torch.Tensor:
        """``[N, G]`` rewards of a rollout (failures score 0 and are counted by the SafeReward)."""
        rows = rollout.row_samples
        if len(rows) != len(rollout.texts):
            raise ValueError(f"rollout has {len(rollout.texts)} responses for {len(rows)} rows")
        values = [self.reward(prompt_of(s), text, s) for s, text in zip(rows, rollout.texts, strict=True)]
        return torch.tensor(values, dtype=torch.float32).reshape(len(rollout.samples), rollout.group_size)

    def _rollout(self, step: int) -> tuple[Rollout, torch.Tensor, dict[str, Any]]:
        cfg = self.config
        info: dict[str, Any] = {}
        n, g = cfg.prompts_per_step, cfg.group_size

        def groups(k: int, round_: int = 0) -> tuple[Rollout, torch.Tensor]:
            rollout = self.engine.generate(self._draw(step, round_, k), g)
            return rollout, self.score(rollout)

        if cfg.dynamic_sampling:
            rounds = iter(range(1, 1 << 20))
            parts: list[Rollout] = []

            def generate_groups(k: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
                rollout, rewards = groups(k, next(rounds))
                parts.append(rollout)
                return [(len(parts) - 1, i) for i in range(k)], rewards

            fill = DynamicSampler(on_shortfall="warn").fill_batch(generate_groups, n, cfg.max_sample_rounds)
            info.update(sample_rounds=fill.rounds, groups_generated=fill.generated)
            if not fill.groups:
                last = parts[-1]
                return subset_groups(last, []), torch.empty(0, g), info
            chosen = [subset_groups(parts[p], [i]) for p, i in fill.groups]
            return concat_rollouts(chosen, self.pad_id), fill.rewards.float(), info
        rollout, rewards = groups(n)
        info["train_reward_all"] = float(rewards.mean())
        if cfg.filter_solved is not None:
            rates = (rewards >= cfg.pass_threshold).float().mean(1)
            keep = [i for i, r in enumerate(rates.tolist()) if r <= cfg.filter_solved]
            info["groups_filtered"] = n - len(keep)
            if len(keep) < n:
                return subset_groups(rollout, keep), rewards[keep], info
        return rollout, rewards, info

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """``[N, G]`` advantages: zeros for ``G = 1`` (no baseline) and for groups with equal rewards."""
        if rewards.shape[1] < 2:
            return torch.zeros_like(rewards)
        return group_advantages(rewards, self.config.advantage_scale)

    @torch.no_grad()
    def _logprobs(self, model: nn.Module, rollout: Rollout, name: str) -> torch.Tensor:
        was_training = model.training
        model.eval()
        out = []
        try:
            rows = rollout.sequences.shape[0]
            for start in range(0, rows, self.config.logprob_batch_size):
                idx = list(range(start, min(rows, start + self.config.logprob_batch_size)))
                seqs, _, inputs = select_rows(rollout, idx)
                lp, _ = rollout_logprobs(
                    model, seqs, inputs, rollout.prompt_length, temperature=self.config.temperature
                )
                out.append(lp)
        finally:
            model.train(was_training)
        logprobs = torch.cat(out)
        bad = int((~torch.isfinite(logprobs) & rollout.completion_mask).sum())
        if bad:
            raise FloatingPointError(
                f"the {name} gave {bad} NaN/inf log-probs on sampled tokens: the weights or the inputs hold "
                "non-finite values (lower the learning rate or check the model)"
            )
        return logprobs

    def _update(
        self, rollout: Rollout, adv: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, step: int
    ) -> dict[str, float]:
        cfg = self.config
        rows = rollout.sequences.shape[0]
        gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
        sums: dict[str, list[float]] = {}
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(rows, generator=gen)
            for part in torch.tensor_split(order, min(cfg.mini_batches, rows)):
                idx = part.tolist()
                seqs, mask, inputs = select_rows(rollout, idx)
                logp, entropy = rollout_logprobs(
                    self.model, seqs, inputs, rollout.prompt_length, temperature=cfg.temperature, with_entropy=True
                )
                loss, metrics = policy_loss(
                    logp,
                    old[part],
                    adv[part],
                    mask,
                    method=cfg.method,  # type: ignore[arg-type]
                    clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high,
                    tau_pos=cfg.tau_pos,
                    tau_neg=cfg.tau_neg,
                    max_tokens=max(cfg.max_new_tokens, int(mask.shape[1])),
                    ref_logprobs=None if ref is None else ref[part],
                    kl_coef=cfg.kl_coef,
                    kl_estimator=cfg.kl_estimator,
                    entropy=entropy,
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm else math.inf)
                self.optimizer.step()
                sums.setdefault("loss", []).append(float(loss.detach()))
                sums.setdefault("grad_norm", []).append(float(norm))
                for key, value in metrics.items():
                    sums.setdefault(key, []).append(float(value))
        self.optimizer.zero_grad(set_to_none=True)
        return {k: _mean(v) for k, v in sums.items()}

    def step(self, step: int) -> dict[str, Any]:
        """One RL step (rollout, rewards, advantages, updates); returns its metrics record."""
        cfg = self.config
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # responses depend only on (seed, step, weights)
        start = time.perf_counter()
        calls, errors = self.reward.calls, self.reward.errors
        rollout, rewards, info = self._rollout(step)
        if self.reward.calls > calls and self.reward.errors - errors == self.reward.calls - calls:
            warnings.warn(
                f"step {step + 1}: every reward call failed and scored 0 (last error: {self.reward.last_error}); "
                "reward_fn must be callable as reward_fn(sample, response)",
                RuntimeWarning,
                stacklevel=2,
            )
        record: dict[str, Any] = {"step": step + 1, **info}
        record["rollout_s"] = time.perf_counter() - start
        if rewards.numel():
            mask = rollout.completion_mask
            record.update(
                reward_mean=float(rewards.mean()),
                reward_std=float(rewards.std()) if rewards.numel() > 1 else 0.0,
                pass_rate=float((rewards >= cfg.pass_threshold).float().mean()),
                response_length=float(mask.sum(1).float().mean()),
                truncation_rate=float(rollout.truncated.float().mean()),
                groups=len(rollout.samples),
            )
        record.update(reward_errors=self.reward.errors, reward_timeouts=self.reward.timeouts)
        adv = self.advantages(rewards).reshape(-1) if rewards.numel() else rewards.reshape(-1)
        if rewards.numel() == 0 or not bool(adv.abs().gt(0).any()):
            record["skipped"] = True  # no group with a learning signal: nothing to update
        else:
            update_start = time.perf_counter()
            old = self._logprobs(self.model, rollout, "rollout policy")
            ref = self._logprobs(self.ref_model, rollout, "reference model") if self.ref_model is not None else None
            record.update(self._update(rollout, adv, old, ref, step))
            record["update_s"] = time.perf_counter() - update_start
            record["skipped"] = False
            sync = getattr(self.engine, "sync_weights", None)
            if callable(sync):  # an external engine (vLLM) samples with a copy of the weights
                sync(self.model)
        with warnings.catch_warnings():  # a skipped step advances the schedule without an optimiser step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return record

    # ------------------------------------------------------------------ public loop

    def evaluate(self, samples: Sequence[dict[str, Any]] | None = None) -> EvalResult:
        """Greedy held-out evaluation on ``samples`` (default: ``eval_samples``).

        Raises:
            ValueError: No samples given and no ``eval_samples``.
        """
        chosen = list(samples) if samples is not None else self.eval_samples
        if not chosen:
            raise ValueError("no samples to evaluate: pass samples or give RLTrainer eval_samples")
        cfg = self.config
        return evaluate(
            self.model,
            self.processor,
            chosen,
            self.reward,
            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
            thinking=cfg.thinking,
            batch_size=cfg.rollout_batch_size,
            greedy=cfg.eval_greedy,
            samples_per_prompt=cfg.eval_samples_per_prompt,
            temperature=cfg.temperature,
            seed=cfg.seed,
        )

    def _eval_record(self, step: int) -> dict[str, Any]:
        result = self.evaluate()
        return {"step": step, "eval_reward": result.mean, **{f"eval_reward/{t}": v for t, v in result.per_task.items()}}

    def train(self) -> RLResult:
        """Run ``max_steps`` RL steps (from the latest checkpoint when resuming); see the module docstring."""
        from vl_train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
        from vl_train.metrics import MetricsLogger
        from vl_train.trainer import check_output_dir

        cfg = self.config
        out = check_output_dir(cfg.output_dir)
        first, history, evals = 0, [], []
        last_ckpt = latest_checkpoint(out) if self.resume else None
        if last_ckpt is not None:
            state = load_checkpoint(last_ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
            first, history = state.step, list(state.metrics)
            evals = list(state.extra.get("eval_history", []))
            self.reward.errors = int(state.extra.get("reward_errors", 0))
            self.reward.timeouts = int(state.extra.get("reward_timeouts", 0))
        logger = MetricsLogger(
            out, total_steps=cfg.max_steps, tensorboard=cfg.tensorboard, progress=cfg.progress, history=history
        )
        checkpoint = last_ckpt
        try:
            if first == 0 and self.eval_samples:
                evals.append(self._eval_record(0))
            for step in range(first, cfg.max_steps):
                record = self.step(step)
                done = step + 1
                if self.eval_samples and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
                    ev = self._eval_record(done)
                    evals.append(ev)
                    record.update({k: v for k, v in ev.items() if k != "step"})
                logger.log(record)
                if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
                    checkpoint = save_checkpoint(
                        out,
                        step=done,
                        model=self.model,
                        optimizer=self.optimizer,
                        scheduler=self.scheduler,
                        metrics=logger.records,
                        extra={
                            "eval_history": evals,
                            "reward_errors": self.reward.errors,
                            "reward_timeouts": self.reward.timeouts,
                            "config": cfg.to_dict(),
                        },
                        keep_last=cfg.keep_last,
                    )
                for callback in self.callbacks:
                    callback(self, done, record)
        finally:
            logger.close(plot=False)
        plot = plot_reward_curve(logger.records, evals, out / REWARD_PLOT) if cfg.plot else None
        return RLResult(
            steps=cfg.max_steps,
            records=logger.records,
            eval_history=evals,
            output_dir=out,
            plot=plot,
            checkpoint=checkpoint,
        )
