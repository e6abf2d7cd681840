"""Which prompts an RL step draws: uniformly, in fixed per-task ratios, or by RLCS difficulty tier.

:class:`PromptSampler` is the prompt-drawing part of :class:`vl_rl.trainer.RLTrainer` (its ``_draw``), with
the papers' data pipelines as :class:`~vl_rl.config.RLConfig` keys (REFERENCE.md section 5):

- uniform (default): a permutation seeded by ``(seed, step, round)``, so a resumed run draws the same prompts;
- ``task_ratios`` (Qwen3-VL's mixed-task batches): every draw of ``n`` prompts holds fixed per-task counts, each
  task walking a seeded permutation of its prompts (:class:`~vl_rl.sampling.MixedTaskBatcher`, one per ``n``);
- ``rlcs`` (GLM-4.5V's curriculum sampling): prompts drawn by difficulty tier,
  :class:`~vl_rl.curriculum.RLCSCurriculum`, started from offline pass rates (the pre-filter's, when it ran)
  and updated with every step's online pass rates (:meth:`PromptSampler.observe`).

Every rank holds the same sampler and makes the same calls in the same order (the trainer gathers the
online pass rates of all ranks before :meth:`PromptSampler.observe`), so the draws agree across ranks.

Notation: ``N`` prompts in the pool, ``n`` prompts drawn at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._dist import distributed
from .config import RLConfig
from .curriculum import RLCSCurriculum
from .prefilter import PrefilterResult
from .sampling import ExpansionRatio, MixedTaskBatcher

__all__ = ["PromptPool", "PromptSampler", "task_of"]


def task_of(sample: Mapping[str, Any]) -> str:
    """A sample's ``task`` (``"default"`` when it has none), as mixed batches and per-task rewards read it."""
    task = sample.get("task")
    return str(task) if task else "default"


class PromptSampler:
    """Draws prompt positions ``0 .. N-1`` for a step (see the module docstring).

    Args:
        tasks: The task of every prompt of the pool, in order.
        config: The run's settings (``seed``, ``task_ratios``, ``rlcs*``).
        pass_rates: Offline pass rates of the pool's prompts (RLCS's starting tiers; None: unknown).

    Raises:
        ValueError: An empty pool, or ``task_ratios`` whose tasks differ from the prompts' tasks (named).
    """

    def __init__(self, tasks: Sequence[str], config: RLConfig, pass_rates: Sequence[float] | None = None) -> None:
        if not tasks:
            raise ValueError("no prompts to draw from")
        self.size, self.seed = len(tasks), int(config.seed)
        self.mode = "rlcs" if config.rlcs else "mixed" if config.task_ratios else "uniform"
        self.ratios: dict[str, float] = dict(config.task_ratios or {})
        self.by_task: dict[str, list[int]] = {}
        for i, task in enumerate(tasks):
            self.by_task.setdefault(task, []).append(i)
        self._batchers: dict[int, MixedTaskBatcher] = {}
        self._saved_batchers: dict[str, Any] = {}
        if self.mode == "mixed":
            unweighted = {t: len(v) for t, v in self.by_task.items() if t not in self.ratios}
            missing = sorted(t for t in self.ratios if t not in self.by_task and self.ratios[t] > 0)
            if unweighted or missing:
                raise ValueError(
                    f"[rl] task_ratios {self.ratios} must weigh exactly the prompts' tasks: prompts of tasks "
                    f"{unweighted} (task: count) have no weight, weighted tasks {missing} have no prompts"
                )
            self.ratios = {t: w for t, w in self.ratios.items() if t in self.by_task}
        self.curriculum: RLCSCurriculum | None = None
        if self.mode == "rlcs":
            rates = None if pass_rates is None else [float("nan") if r is None else float(r) for r in pass_rates]
            self.curriculum = RLCSCurriculum(
                self.size,
                tiers=config.rlcs_tiers,
                ema=config.rlcs_ema,
                init_pass_rates=rates,
                min_weight=config.rlcs_min_weight,
                seed=self.seed,
            )

    def draw(self, step: int, round_: int, n: int) -> list[int]:
        """``n`` prompt positions for ``(step, round_)`` (repeats only when ``n`` exceeds the pool)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 101 + round_)
        if self.mode == "uniform":
            order = torch.randperm(self.size, generator=gen).tolist()
            while len(order) < n:  # fewer prompts than asked for: draw with repeats
                order += torch.randperm(self.size, generator=gen).tolist()
            return order[:n]
        if self.mode == "mixed":
            picked = self._batcher(n).next_batch()
            # the batcher lays prompts out task by task: shuffle so each rank's share mixes the tasks too
            return [picked[i] for i in torch.randperm(n, generator=gen).tolist()]
        assert self.curriculum is not None
        out: list[int] = []
        while len(out) < n:
            out += self.curriculum.sample(min(n - len(out), self.size))
        return out

    def _batcher(self, n: int) -> MixedTaskBatcher:
        if n not in self._batchers:
            batcher = MixedTaskBatcher(self.by_task, self.ratios, n, seed=self.seed * 31 + n)
            if str(n) in self._saved_batchers:
                batcher.load_state_dict(self._saved_batchers.pop(str(n)))
            self._batchers[n] = batcher
        return self._batchers[n]

    def observe(self, positions: Sequence[int], rewards: torch.Tensor, threshold: float) -> None:
        """Fold the pass rates of drawn groups (``rewards [len(positions), G]``) into RLCS (no-op otherwise)."""
        if self.curriculum is None or not len(positions):
            return
        rates = (rewards >= threshold).double().mean(1)
        self.curriculum.update(list(positions), rates)

    def metrics(self) -> dict[str, float]:
        """RLCS tier weights (``rlcs/tier<t>``) and the share of prompts seen so far; empty otherwise."""
        if self.curriculum is None:
            return {}
        out = {f"rlcs/tier{t}": float(w) for t, w in enumerate(self.curriculum.tier_weights().tolist())}
        out["rlcs/seen"] = float((~self.curriculum.pass_rates.isnan()).double().mean())
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to draw on exactly as this one would have."""
        state: dict[str, Any] = {"mode": self.mode, "size": self.size}
        if self.mode == "mixed":
            state["batchers"] = {**self._saved_batchers, **{str(n): b.state_dict() for n, b in self._batchers.items()}}
        if self.curriculum is not None:
            state["rlcs"] = self.curriculum.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ValueError: The state belongs to another sampling mode or pool size.
        """
        if state.get("mode") != self.mode or int(state.get("size", -1)) != self.size:
            raise ValueError(
                f"the checkpoint drew prompts by {state.get('mode')!r} from {state.get('size')} prompts; this run "
                f"draws by {self.mode!r} from {self.size}: resume with the run's data and settings"
            )
        self._batchers, self._saved_batchers = {}, dict(state.get("batchers", {}))
        if self.curriculum is not None:
            self.curriculum.load_state_dict(dict(state["rlcs"]))


class PromptPool:
    """The prompts a run draws from: its samples, the pass-rate filter's cut, the sampler, the expansion ratio.

    Args:
        samples: The training prompts.
        config: The run's settings.

    Raises:
        ValueError: No samples, or ``task_ratios`` that do not fit the prompts' tasks.
    """

    def __init__(self, samples: Sequence[dict[str, Any]], config: RLConfig) -> None:
        self.samples, self.config = list(samples), config
        self.positions = list(range(len(self.samples)))  # into samples: all, or the filter's kept ones
        self.prefilter: PrefilterResult | None = None
        self.sampler = PromptSampler([task_of(s) for s in self.samples], config)
        self.expansion = ExpansionRatio(config.expansion_ema) if config.expansion_ema is not None else None

    def draw(self, step: int, round_: int, n: int, rank: int, world: int) -> list[int]:
        """Rank ``rank``'s share of the ``n`` pool positions drawn for ``(step, round_)``."""
        share = n // world
        return self.sampler.draw(step, round_, n)[rank * share : (rank + 1) * share]

    def sample(self, position: int) -> dict[str, Any]:
        """The prompt at a pool position."""
        return self.samples[self.positions[position]]

    def observe(self, drawn: list[tuple[list[int], torch.Tensor]]) -> None:
        """Fold every rank's drawn groups (positions, ``[n, G]`` rewards) of a step into RLCS, in rank order."""
        if self.sampler.curriculum is None:
            return
        if distributed():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, drawn)
            drawn = [item for part in gathered for item in part]
        for positions, rewards in drawn:
            self.sampler.observe(positions, rewards, self.config.pass_threshold)

    def metrics(self) -> dict[str, float]:
        """The sampler's metrics and the expansion ratio (for the step record)."""
        out = self.sampler.metrics()
        if self.expansion is not None:
            out["expansion_ratio"] = self.expansion.ratio
        return out

    def use_prefilter(self, result: PrefilterResult) -> None:
        """Draw only the prompts the pass-rate filter kept (RLCS starts from their offline pass rates).

        Raises:
            ValueError: The result is for another number of prompts, or kept none (the counts named).
        """
        if len(result.pass_rates) != len(self.samples):
            raise ValueError(
                f"the pass-rate filter scored {len(result.pass_rates)} prompts but this run has {len(self.samples)}: "
                "resume with the run's data"
            )
        if not result.kept:
            stats = result.stats
            raise ValueError(
                f"the pass-rate filter kept none of {int(stats['total'])} prompts ({int(stats['too_easy'])} solved "
                f"more than {result.settings['high']:.0%} of the time, {int(stats['all_wrong'])} never solved): nothing "
                "to learn from; see prefilter/pass_rates.jsonl, check the reward on a few responses, or turn it off"
            )
        self.prefilter, self.positions = result, list(result.kept)
        tasks = [task_of(self.samples[i]) for i in self.positions]
        self.sampler = PromptSampler(tasks, self.config, [result.pass_rates[i] for i in self.positions])

    def state_dict(self) -> dict[str, Any]:
        """The filter's result, the sampler's and the expansion ratio's state (a checkpoint's data state)."""
        return {
            "prefilter": None if self.prefilter is None else self.prefilter.to_dict(),
            "sampler": self.sampler.state_dict(),
            "expansion": None if self.expansion is None else self.expansion.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the filtered prompts are not scored again)."""
        if state.get("prefilter") is not None:
            self.use_prefilter(PrefilterResult.from_dict(dict(state["prefilter"])))
        self.sampler.load_state_dict(state["sampler"])
        if self.expansion is not None and state.get("expansion") is not None:
            self.expansion.load_state_dict(state["expansion"])
