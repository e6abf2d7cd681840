"""``RLTrainer``: rollouts, verifiable rewards, group advantages, then mini-batch policy updates.

Implements one RL step of Qwen3-VL's reasoning RL (REFERENCE.md section 5), with the pieces of this
package and of vl-train:

1. draw ``N`` prompts (:class:`~vl_rl.prompt_sampling.PromptSampler`: uniformly, in fixed per-task ratios,
   or by RLCS difficulty tier; a resumed run draws the same ones); with ``W`` ranks each rank takes ``N / W``
   of them. With ``prefilter_rollouts`` the pool is first cut to the prompts the starting policy solves
   sometimes but at most ``prefilter_high`` of the time (:mod:`vl_rl.prefilter`, before the first step);
2. roll out ``G`` responses each (:class:`~vl_rl.rollout.HFRolloutEngine` or any ``RolloutEngine``);
3. score them with the reward wrapped in :class:`~vl_rl.rewards.SafeReward` (errors and timeouts
   score 0 and are counted); optionally drop groups solved more often than ``filter_solved``
   (Qwen3-VL: 0.9), or resample until every group has mixed rewards (DAPO dynamic sampling,
   :class:`~vl_rl.sampling.DynamicSampler`, over-sampling by GLM-4.5V's EMA expansion ratio with
   ``expansion_ema``); RLCS folds every group's pass rate into its tiers;
4. :func:`~vl_rl.advantages.group_advantages` (zeros for ``G = 1`` and for all-equal groups); a step
   where no group has a learning signal makes no update and is logged as ``no_signal``;
5. old log-probs of the rollout policy (and of ``ref_model`` when ``kl_coef > 0``), without gradients;
6. ``epochs x mini_batches`` AdamW updates of :func:`~vl_rl.losses.policy_loss` against the old
   log-probs, each scaled by this rank's share of the global batch's aggregation weight (so ``W``
   FSDP ranks give the gradient of one process), with clipping and the non-finite guard; the
   learning-rate schedule advances once per RL step.

The run itself (optimiser, FSDP2, checkpoints and exact resume, metrics, callbacks) is
:class:`vl_train.loop.TrainingLoop`'s. Held-out evaluation runs before training, every ``eval_every``
steps and at the end; ``reward_curve.png`` plots train and held-out rewards.

Notation: ``N`` prompts per step, ``G`` responses per prompt, ``R = N * G`` rows, ``T`` completion tokens,
``W`` ranks.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vl_train.logprobs import completion_logprobs
from vl_train.loop import TrainingLoop, TrainResult
from vl_train.parallel import rank, root_forward, world_size

from ._diagnose import no_signal_message
from ._dist import agreed
from .advantages import group_advantages
from .config import RLConfig
from .evaluate import (
    REWARD_PLOT,
    EvalResult,
    SampleReward,
    evaluate,
    merge_results,
    plot_reward_curve,
    prompt_of,
    sample_reward,
)
from .losses import METHOD_DEFAULTS, policy_loss
from .prefilter import PrefilterResult, prefilter_prompts, write_prefilter_report
from .prompt_sampling import PromptPool
from .rewards import SafeReward
from .rollout import (
    HFRolloutEngine,
    Rollout,
    RolloutEngine,
    concat_rollouts,
    select_rows,
    subset_groups,
)
from .sampling import DynamicSampler

__all__ = ["RLResult", "RLTrainer"]

Callback = Callable[["RLTrainer", dict[str, Any]], object]
"""``callback(trainer, record)`` after every step; a truthy return value stops the run."""


@dataclass
class RLResult(TrainResult):
    """What :meth:`RLTrainer.train` did: :class:`vl_train.TrainResult` plus the held-out evaluations.

    Attributes:
        eval_history: ``{"step", "eval_reward", "eval_reward/<task>"}`` per evaluation.
        no_signal_steps: Steps without a learning signal (every group's rewards equal): no update.
        warning: Why the run probably learned nothing, when most steps had no signal (also warned); else None.
        prefilter: The pass-rate filter's result when it ran (kept prompts, pass rates, counts).
    """

    eval_history: list[dict[str, Any]] = field(default_factory=list)
    no_signal_steps: int = 0
    warning: str | None = None
    prefilter: PrefilterResult | None = None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class RLTrainer(TrainingLoop):
    """Trains a policy with verifiable rewards (see the module docstring).

    Args:
        model: The policy, a :class:`vl_model.TrainableVLM` (core or composed model).
        processor: Its processor.
        config: The run's :class:`~vl_rl.config.RLConfig`.
        train_samples: Prompts to draw from (suite samples with ``messages``; answers for the reward).
        reward_fn: ``reward_fn(sample, response) -> float`` (or a :class:`~vl_rl.rewards.SafeReward`).
        eval_samples: Held-out samples for :meth:`evaluate` (None: no evaluation).
        ref_model: Frozen reference policy for the KL penalty (needed when ``kl_coef > 0``).
        engine: Rollout engine (default: an :class:`~vl_rl.rollout.HFRolloutEngine` from the config).
        callbacks: ``callback(trainer, record)`` after every step; a truthy return value stops the run.
        resume: ``True``: continue from the latest valid checkpoint in ``output_dir`` (a fresh start when
            there is none); a path: from that checkpoint.
        overwrite: Start afresh in an output folder that holds another run (deleting its checkpoints and
            metrics); without it such a folder is an error.

    Raises:
        ValueError: No training samples, ``kl_coef > 0`` without a reference model, prompts per step
            that the ranks cannot share equally, or ``task_ratios`` that do not weigh exactly the prompts'
            tasks (``sample["task"]``, ``"default"`` when absent).
    """

    config: RLConfig

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
        resume: bool | str | Path = False,
        overwrite: bool = False,
    ) -> None:
        if len(train_samples) == 0:
            raise ValueError("RLTrainer needs at least one training sample")
        if config.kl_coef > 0 and ref_model is None:
            raise ValueError(f"kl_coef={config.kl_coef} needs a ref_model (or set kl_coef=0)")
        if config.prompts_per_step % world_size():
            raise ValueError(
                f"prompts_per_step={config.prompts_per_step} must be a multiple of the {world_size()} ranks"
            )
        self.processor = processor
        self.train_samples, self.eval_samples = list(train_samples), list(eval_samples or [])
        self.reward = sample_reward(reward_fn, config.reward_timeout)
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
        self.eval_history: list[dict[str, Any]] = []
        self.pad_id = int(processor.tokenizer.pad_token_id)
        self.pool = PromptPool(self.train_samples, config)
        super().__init__(model, config, callbacks=callbacks, resume=resume, overwrite=overwrite)
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

    # ------------------------------------------------------------------ TrainingLoop hooks

    def extra_state(self) -> dict[str, Any]:
        """Evaluation history and reward-failure counters."""
        return {
            "eval_history": self.eval_history,
            "reward_errors": self.reward.errors,
            "reward_timeouts": self.reward.timeouts,
        }

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""
        self.eval_history = list(extra.get("eval_history", []))
        self.reward.errors = int(extra.get("reward_errors", 0))
        self.reward.timeouts = int(extra.get("reward_timeouts", 0))

    def data_state(self) -> dict[str, Any]:
        """The prompt pool's state: the pass-rate filter's result, the sampler's and the expansion ratio's."""
        return self.pool.state_dict()

    def load_data_state(self, state: Any) -> None:
        """Restore what :meth:`data_state` saved (the filtered prompts are not scored again)."""
        self.pool.load_state_dict(state)

    def prefilter(self) -> PrefilterResult:
        """Run the pass-rate filter with the current policy and train on what it keeps (module docstring).

        Writes ``prefilter/`` (:func:`~vl_rl.prefilter.write_prefilter_report`) into the output folder.

        Raises:
            ValueError: It kept no prompt.
        """
        cfg = self.config
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed * 7_919 + 17 + rank())
            result = prefilter_prompts(
                self.engine,
                self.reward,
                self.train_samples,
                rollouts=cfg.prefilter_rollouts,
                high=cfg.prefilter_high,
                drop_all_wrong=cfg.prefilter_drop_all_wrong,
                pass_threshold=cfg.pass_threshold,
                prompts_per_call=max(1, cfg.rollout_batch_size // cfg.prefilter_rollouts),
            )
        if rank() == 0:
            write_prefilter_report(self.output_dir / "prefilter", self.train_samples, result)
        self.pool.use_prefilter(result)
        return result

    def on_train_start(self) -> None:
        """Run the pass-rate filter (when asked, once per run); evaluate the starting policy (a fresh run only)."""
        if self.config.prefilter_rollouts and self.pool.prefilter is None:
            self.prefilter()
        if self.step == 0 and self.eval_samples and not self.eval_history:
            self.eval_history.append(self._eval_record(0))

    def after_step(self, record: dict[str, Any]) -> None:
        """Held-out evaluation every ``eval_every`` steps and after the last one (added to the record)."""
        cfg, done = self.config, self.step
        if self.eval_samples and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
            ev = self._eval_record(done)
            self.eval_history.append(ev)
            record.update({k: v for k, v in ev.items() if k != "step"})

    def plot(self, records: Sequence[dict[str, Any]]) -> Path | None:
        """``reward_curve.png``: train reward per step and held-out reward per evaluation."""
        return plot_reward_curve(records, self.eval_history, self.output_dir / REWARD_PLOT)

    def finish(self, result: TrainResult) -> RLResult:
        """The :class:`RLResult`; warns, naming the causes seen, when most steps had no learning signal."""
        no_signal = sum(bool(r.get("no_signal")) for r in result.records)
        message = no_signal_message(result.records, self.config.group_size, self.reward)
        if message is not None:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        fields = {k: getattr(result, k) for k in result.__dataclass_fields__}
        return RLResult(
            **fields,
            eval_history=list(self.eval_history),
            no_signal_steps=no_signal,
            warning=message,
            prefilter=self.pool.prefilter,
        )

    def train(self) -> RLResult:
        """Run ``max_steps`` RL steps (see :meth:`vl_train.TrainingLoop.train`); returns an :class:`RLResult`."""
        result = super().train()
        assert isinstance(result, RLResult)
        return result

    # ------------------------------------------------------------------ pieces of a step

    def _draw(self, step: int, round_: int, n: int) -> list[dict[str, Any]]:
        """This rank's share of the ``n`` prompts drawn for ``(step, round_)`` (the same draw on every rank)."""
        return [self.pool.sample(p) for p in self.pool.draw(step, round_, n, rank(), world_size())]

    def score(self, rollout: Rollout) -> torch.Tensor:
        """``[N, G]`` rewards of a rollout (failures score 0 and are counted by the SafeReward)."""
        rows = rollout.row_samples
        if len(rows) != len(rollout.texts):
            raise ValueError(f"rollout has {len(rollout.texts)} responses for {len(rows)} rows")
        values = [self.reward(prompt_of(s), text, s) for s, text in zip(rows, rollout.texts, strict=True)]
        return torch.tensor(values, dtype=torch.float32).reshape(len(rollout.samples), rollout.group_size)

    def _rollout(self, step: int) -> tuple[Rollout, torch.Tensor, dict[str, Any]]:
        info: dict[str, Any] = {}
        drawn: list[tuple[list[int], torch.Tensor]] = []

        def groups(k: int, round_: int = 0) -> tuple[Rollout, torch.Tensor]:
            positions = self.pool.draw(step, round_, k * world_size(), rank(), world_size())
            rollout = self.engine.generate([self.pool.sample(p) for p in positions], self.config.group_size)
            rewards = self.score(rollout)
            drawn.append((positions, rewards))
            return rollout, rewards

        out = self._sample_groups(groups, info)
        self.pool.observe(drawn)  # RLCS learns from every group generated, the dropped ones too
        info.update(self.pool.metrics())
        return out

    def _sample_groups(
        self, groups: Callable[..., tuple[Rollout, torch.Tensor]], info: dict[str, Any]
    ) -> tuple[Rollout, torch.Tensor, dict[str, Any]]:
        cfg = self.config
        n, g = cfg.prompts_per_step, cfg.group_size

        if cfg.dynamic_sampling:
            rounds = iter(range(1, 1 << 20))
            parts: list[Rollout] = []

            def generate_groups(k: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
                rollout, rewards = groups(k, next(rounds))
                parts.append(rollout)
                return [(len(parts) - 1, i) for i in range(k)], rewards

            share = n // world_size()
            sampler = DynamicSampler(self.pool.expansion, on_shortfall="warn")
            fill = sampler.fill_batch(generate_groups, share, cfg.max_sample_rounds, agree=agreed)
            info.update(sample_rounds=fill.rounds, groups_generated=fill.generated)
            if not fill.groups:
                last = parts[-1]
                return subset_groups(last, []), torch.empty(0, g), info
            chosen = [subset_groups(parts[p], [i]) for p, i in fill.groups]
            return concat_rollouts(chosen, self.pad_id), fill.rewards.float(), info
        rollout, rewards = groups(n // world_size())
        info["train_reward_all"] = float(rewards.mean())
        if cfg.filter_solved is not None:
            rates = (rewards >= cfg.pass_threshold).float().mean(1)
            keep = [i for i, r in enumerate(rates.tolist()) if r <= cfg.filter_solved]
            info["groups_filtered"] = len(rates) - len(keep)
            if len(keep) < len(rates):
                return subset_groups(rollout, keep), rewards[keep], info
        return rollout, rewards, info

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """``[N, G]`` advantages: zeros for ``G = 1`` (no baseline) and for groups with equal rewards."""
        if rewards.shape[1] < 2:
            return torch.zeros_like(rewards)
        return group_advantages(rewards, self.config.advantage_scale)

    def _scored(self, model: nn.Module, rollout: Rollout, rows: Sequence[int], **kw: Any) -> Any:
        seqs, _, inputs = select_rows(rollout, rows)
        return root_forward(
            model,
            completion_logprobs,
            model,
            seqs.to(self.device),
            {k: v.to(self.device) for k, v in inputs.items()},
            rollout.prompt_length,
            temperature=self.config.temperature,
            **kw,
        )

    @torch.no_grad()
    def _logprobs(self, model: nn.Module, rollout: Rollout, name: str) -> torch.Tensor:
        rows, size = rollout.sequences.shape[0], self.config.logprob_batch_size
        was_training = model.training
        model.eval()
        out = []
        try:
            for k in range(agreed(-(-rows // size), max)):  # every rank runs as many forwards
                idx = list(range(k * size, min(rows, (k + 1) * size))) or [0]
                lp, _ = self._scored(model, rollout, idx)
                if k * size < rows:
                    out.append(lp)
        finally:
            model.train(was_training)
        logprobs = torch.cat(out).cpu() if out else torch.zeros(0, rollout.completion_mask.shape[1])
        bad = int((~torch.isfinite(logprobs) & rollout.completion_mask).sum())
        if bad:
            raise FloatingPointError(
                f"the {name} gave {bad} NaN/inf log-probs on sampled tokens: the weights or the inputs hold "
                "non-finite values (lower the learning rate or check the model)"
            )
        return logprobs

    def _aggregation_share(self, mask: torch.Tensor) -> float:
        """This rank's share of the global mini-batch's aggregation weight, times ``W`` (1 for one process)."""
        aggregation = METHOD_DEFAULTS[self.config.method][2]
        if aggregation == "token_mean":
            local = float(mask.sum())
        elif aggregation == "const":
            local = float(mask.shape[0])
        else:  # seq_mean (and gspo's mean over sequences): sequences with a trained token
            local = float(mask.any(1).sum())
        total = agreed(local, sum)
        return local / total * world_size() if total > 0 else 0.0

    def _update(
        self, rollout: Rollout, adv: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, step: int
    ) -> dict[str, float]:
        cfg = self.config
        rows = rollout.sequences.shape[0]
        gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step + 104_729 * rank())
        sums: dict[str, list[float]] = {}
        nonfinite = 0
        self.model.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(rows, generator=gen)
            for part in torch.tensor_split(order, cfg.mini_batches):
                idx = part.tolist() or [0]  # an empty part still runs (zero weight) to keep ranks in step
                mask = rollout.completion_mask[idx].to(self.device) & bool(part.numel())
                logp, entropy = self._scored(self.model, rollout, idx, with_entropy=True)
                loss, metrics = policy_loss(
                    logp,
                    old[idx].to(self.device),
                    adv[idx].to(self.device),
                    mask,
                    method=cfg.method,  # type: ignore[arg-type]
                    clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high,
                    tau_pos=cfg.tau_pos,
                    tau_neg=cfg.tau_neg,
                    max_tokens=max(cfg.max_new_tokens, int(mask.shape[1])),
                    ref_logprobs=None if ref is None else ref[idx].to(self.device),
                    kl_coef=cfg.kl_coef,
                    kl_estimator=cfg.kl_estimator,
                    entropy=entropy,
                    check_finite=False,
                )
                share = self._aggregation_share(mask)
                (loss * share).backward()
                norm, stepped = self.optimizer_step(loss.detach())
                nonfinite += int(not stepped)
                world = world_size()
                # the global batch's loss; the other metrics are averaged over ranks
                sums.setdefault("loss", []).append(agreed(float(loss.detach()) * share / world, sum))
                sums.setdefault("grad_norm", []).append(norm)
                for key, value in metrics.items():
                    sums.setdefault(key, []).append(agreed(float(value), sum) / world)
        out = {k: _mean(v) for k, v in sums.items()}
        out["nonfinite_updates"] = nonfinite
        return out

    def train_step(self) -> dict[str, Any]:
        """One RL step (rollout, rewards, advantages, updates); returns its metrics record."""
        cfg, step = self.config, self.step
        torch.manual_seed(cfg.seed * 1_000_003 + step + 7_777 * rank())  # responses depend on (seed, step, rank)
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
        record: dict[str, Any] = dict(info)
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
        signal = agreed(int(rewards.numel() > 0 and bool(adv.abs().gt(0).any())), max)
        record["no_signal"] = not signal
        record["skipped"] = False
        if signal:
            update_start = time.perf_counter()
            if not rewards.numel():  # this rank kept no group: zero-weight passes keep the collectives in step
                rollout, adv = self._placeholder_rollout(rollout), torch.zeros(1)
            old = self._logprobs(self.model, rollout, "rollout policy")
            ref = self._logprobs(self.ref_model, rollout, "reference model") if self.ref_model is not None else None
            record.update(self._update(rollout, adv, old, ref, step))
            record["update_s"] = time.perf_counter() - update_start
            record["skipped"] = record["nonfinite_updates"] > 0
            sync = getattr(self.engine, "sync_weights", None)
            if callable(sync):  # an external engine (vLLM) samples with a copy of the weights
                sync(self.model)
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return record

    def _placeholder_rollout(self, rollout: Rollout) -> Rollout:
        """One untrained row (its mask all False) standing in for an empty rollout on this rank."""
        if rollout.sequences.shape[0]:
            return subset_groups(rollout, [0]) if rollout.samples else rollout
        sample = self.pool.sample(0)  # not drawn: a draw would move RLCS on this rank only
        one = self.engine.generate([sample], 1, greedy=True)
        one.completion_mask = torch.zeros_like(one.completion_mask)
        return one

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, samples: Sequence[dict[str, Any]] | None = None) -> EvalResult:
        """Held-out evaluation on ``samples`` (default: ``eval_samples``); every rank scores a share.

        Raises:
            ValueError: No samples given and no ``eval_samples``.
        """
        chosen = list(samples) if samples is not None else self.eval_samples
        if not chosen:
            raise ValueError("no samples to evaluate: pass samples or give RLTrainer eval_samples")
        cfg, world = self.config, world_size()
        share = -(-len(chosen) // world)
        mine = chosen[rank() * share : (rank() + 1) * share]
        padded = mine + [chosen[0]] * (share - len(mine))  # equal counts: the same generate calls on every rank
        result = evaluate(
            self.model,
            self.processor,
            padded,
            self.reward,
            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
            thinking=cfg.thinking,
            batch_size=cfg.rollout_batch_size,
            greedy=cfg.eval_greedy,
            samples_per_prompt=cfg.eval_samples_per_prompt,
            temperature=cfg.temperature,
            seed=cfg.seed,
        )
        if world == 1:
            return result
        k = len(result.rewards) // len(padded)
        local = [
            (s, result.rewards[i * k : (i + 1) * k], result.responses[i * k : (i + 1) * k]) for i, s in enumerate(mine)
        ]
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, local)
        return merge_results([item for part in gathered for item in part])

    def _eval_record(self, step: int) -> dict[str, Any]:
        result = self.evaluate()
        return {"step": step, "eval_reward": result.mean, **{f"eval_reward/{t}": v for t, v in result.per_task.items()}}
