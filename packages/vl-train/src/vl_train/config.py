"""Run configurations: one optimiser section and one run section shared by every trainer.

- :class:`OptimConfig`: AdamW and its warm-up + cosine schedule, per-part learning rates, clipping.
  The ``[optim]`` section of every recipe (``vl-train`` and ``vl-rl``).
- :class:`RunConfig`: what any training run needs besides its step: parts that train, steps, the
  optimiser, seed, output folder, checkpoints, metrics and the non-finite guard. ``TrainConfig`` here
  and ``vl_rl.RLConfig`` extend it.
- :class:`TrainConfig`: the supervised trainer's settings (batches, packing, loss reduction, ...) and,
  for distillation, a :class:`DistillSpec`.

Stage presets (``vl_train.stages``) are ``TrainConfig`` values. ``from_dict`` / ``replace`` reject
unknown keys by name; ``optim`` may be given as a mapping of its fields, merged into the current one.

Notation: "parts" are ``vision`` (tower blocks and embeddings), ``merger``, ``deepstack`` (DeepStack
mergers) and ``llm`` (decoder and output head), as in ``vl_model.PARTS``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from vl_model.runtime import PARTS

__all__ = [
    "PARTS",
    "DistillSpec",
    "LossReduction",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "type_problem",
]

LossReduction = Literal["sqrt", "token", "sample"]
DistillMode = Literal["off_policy", "on_policy"]
DistillLoss = Literal["ce", "forward_kl", "reverse_kl", "jsd"]
_DISTILL_LOSSES: dict[str, tuple[str, ...]] = {
    "off_policy": ("ce", "forward_kl", "jsd"),
    "on_policy": ("reverse_kl", "jsd"),
}

C = TypeVar("C")


def type_problem(hint: Any, value: Any) -> str | None:
    """What ``value`` should be to match a field's type hint, or ``None`` when it matches."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or dataclasses.is_dataclass(hint):
        return None
    if origin in (typing.Union, types.UnionType):
        problems = [type_problem(arg, value) for arg in args]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    if origin is Literal:
        return None if value in args else f"one of {list(args)}"
    if origin in (tuple, list):
        if not isinstance(value, tuple | list):
            return "a list"
        fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
        if fixed and len(args) != len(value):
            return f"a list of {len(args)} values"
        kinds = args if fixed else [args[0]] * len(value) if args else []
        bad = [p for item, kind in zip(value, kinds, strict=False) if (p := type_problem(kind, item))]
        return f"a list whose items are each {bad[0]}" if bad else None
    if origin is dict or hint is dict:
        return None if isinstance(value, Mapping) else "a table"
    if hint is type(None):
        return None if value is None else "none"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    return None


def config_from_dict(cls: type[C], data: Mapping[str, Any], what: str) -> C:
    """``cls(**data)`` after checking the keys (unknown ones named, known ones listed) and the value types.

    Raises:
        ValueError: One line naming the unknown keys, or the key whose value has the wrong type (and the
            value), e.g. a recipe's ``--set train.packing=yes``.
    """
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; known keys are {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        problem = type_problem(hints.get(name, Any), value)
        if problem is not None:
            raise ValueError(f"{what} key {name!r} must be {problem}, got {value!r}")
    return cls(**dict(data))


def _positive_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{owner}.{name} must be a {kind} int, got {value!r}")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with one group per part, linear warm-up then cosine decay (``vl_train.optim``).

    Attributes:
        lr: Peak learning rate of every trainable part without its own rate.
        lr_vision: Peak rate of the tower (``None``: ``lr``).
        lr_merger: Peak rate of the merger and DeepStack mergers (``None``: ``lr``).
        lr_llm: Peak rate of the language model (``None``: ``lr``).
        weight_decay: Decoupled weight decay (not applied to biases and norms).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Linear warm-up steps from 0 to the peak rate.
        min_lr_ratio: Cosine decay ends at ``min_lr_ratio * peak`` (1.0: a constant rate after warm-up).
        max_grad_norm: Clip the gradient norm to this (``None``: no clipping).
    """

    lr: float = 1e-5
    lr_vision: float | None = None
    lr_merger: float | None = None
    lr_llm: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        rates = {"lr": self.lr, "lr_vision": self.lr_vision, "lr_merger": self.lr_merger, "lr_llm": self.lr_llm}
        bad = {k: v for k, v in rates.items() if v is not None and not float(v) >= 0}
        if bad or not self.lr > 0:
            raise ValueError(f"OptimConfig learning rates must be >= 0 (lr > 0), got {rates}")
        _positive_int("OptimConfig", "warmup_steps", self.warmup_steps, 0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"OptimConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")

    def part_lr(self, part: str) -> float:
        """Peak learning rate of one part (its own rate, else ``lr``)."""
        own = {"vision": self.lr_vision, "merger": self.lr_merger, "deepstack": self.lr_merger, "llm": self.lr_llm}
        if part not in own:
            raise ValueError(f"unknown part {part!r}; parts are {list(PARTS)}")
        value = own[part]
        return self.lr if value is None else value

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OptimConfig:
        """Build from field names (unknown keys raise ``ValueError`` naming them)."""
        return config_from_dict(cls, data, "[optim]")

    def replace(self, **overrides: Any) -> OptimConfig:
        """A copy with ``overrides`` applied."""
        return self.from_dict({**self.to_dict(), **overrides})


@dataclass(frozen=True, kw_only=True)
class DistillSpec:
    """How a distillation run learns from its teacher.

    Attributes:
        mode: ``"off_policy"`` (teacher-written data) or ``"on_policy"`` (the student samples).
        loss: Off-policy ``"ce"``, ``"forward_kl"`` or ``"jsd"``; on-policy ``"reverse_kl"`` or ``"jsd"``.
        beta: GKD's JSD interpolation in ``[0, 1]`` (0 forward KL, 1 reverse KL).
        temperature: Sampling and scoring temperature (> 0).
        max_new_tokens: Tokens the student samples per prompt on-policy.
    """

    mode: DistillMode = "off_policy"
    loss: DistillLoss = "ce"
    beta: float = 0.5
    temperature: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.mode not in _DISTILL_LOSSES:
            raise ValueError(f"distillation mode must be one of {list(_DISTILL_LOSSES)}, got {self.mode!r}")
        if self.loss not in _DISTILL_LOSSES[self.mode]:
            raise ValueError(
                f"{self.mode} distillation supports losses {list(_DISTILL_LOSSES[self.mode])}, got {self.loss!r}"
            )
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values."""
        return dataclasses.asdict(self)


R = TypeVar("R", bound="RunConfig")


@dataclass(kw_only=True)
class RunConfig:
    """Settings every training run has (supervised, distillation, RL).

    Attributes:
        trainable: Parts that train; the others are frozen.
        max_steps: Optimiser steps (RL: rollout steps) of the run.
        optim: The optimiser and its schedule.
        activation_checkpointing: Recompute decoder layers and tower blocks in the backward pass.
        max_nan_steps: Consecutive steps with a non-finite loss or gradient that are skipped before the
            run stops.
        seed: Seed of the model init, data order, sampling and dropout.
        output_dir: Where checkpoints, metrics and plots go (checked writable before training).
        save_every: Write a checkpoint every this many steps (0: only at the end).
        keep_last: Checkpoints of this run kept on disk (0: all).
        checkpoint_format: ``"full"``: rank 0 writes the gathered state (``model.safetensors``);
            ``"sharded"``: every rank writes its own shards with ``torch.distributed.checkpoint`` (no gather;
            resumable on another world size; :func:`vl_train.dcp_checkpoint.export_pretrained` writes the
            Hugging Face checkpoint).
        tensorboard: Also write TensorBoard event files (needs ``tensorboard``).
        plot: Write a PNG of the run's curve at the end (needs ``matplotlib``).
        progress: Show a progress bar (quiet when stderr is not a terminal).
    """

    trainable: tuple[str, ...] = PARTS
    max_steps: int = 100
    optim: OptimConfig = field(default_factory=OptimConfig)
    activation_checkpointing: bool = False
    max_nan_steps: int = 3
    seed: int = 0
    output_dir: str = "runs/default"
    save_every: int = 0
    keep_last: int = 2
    checkpoint_format: Literal["full", "sharded"] = "full"
    tensorboard: bool = True
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.trainable = tuple(self.trainable)
        unknown = [p for p in self.trainable if p not in PARTS]
        if unknown or not self.trainable:
            raise ValueError(
                f"{type(self).__name__}.trainable has unknown parts {unknown} (or none); parts are {list(PARTS)}"
            )
        if isinstance(self.optim, Mapping):
            self.optim = OptimConfig.from_dict(self.optim)
        if not isinstance(self.optim, OptimConfig):
            raise ValueError(f"{type(self).__name__}.optim must be an OptimConfig or a mapping, got {self.optim!r}")
        owner = type(self).__name__
        if self.checkpoint_format not in ("full", "sharded"):
            raise ValueError(f"{owner}.checkpoint_format must be 'full' or 'sharded', got {self.checkpoint_format!r}")
        _positive_int(owner, "max_steps", self.max_steps, 1)
        for name in ("save_every", "keep_last", "max_nan_steps"):
            _positive_int(owner, name, getattr(self, name), 0)

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain values (``from_dict(cfg.to_dict()) == cfg``)."""
        out = dataclasses.asdict(self)
        out["trainable"] = list(self.trainable)
        return out

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        """Build from a mapping of field names; unknown keys raise ``ValueError`` naming them."""
        return config_from_dict(cls, data, f"{cls.__name__}")

    def replace(self: R, **overrides: Any) -> R:
        """A copy with ``overrides`` applied; an ``optim`` mapping updates only the fields it names."""
        optim = overrides.pop("optim", None)
        data = {**self.to_dict(), **overrides}
        if isinstance(optim, Mapping):
            data["optim"] = self.optim.replace(**optim)
        elif optim is not None:
            data["optim"] = optim
        return self.from_dict(data)


@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    """The supervised trainer's settings (``vl_train.Trainer``, ``DistillTrainer``); see :class:`RunConfig`.

    Attributes:
        stage: Name of the preset this config came from (``"S0"``, ``"S1"``, ..., ``"custom"``).
        micro_batch_size: Rows per forward pass.
        grad_accum_steps: Micro-batches per optimiser step.
        max_length: Tokens per row (packed rows are filled up to it).
        packing: Pack samples into rows (positions restart and attention stays within each sample).
        thinking: Render assistant turns in the thinking format (``"on"``), without it (``"off"``),
            or by sample (``"auto"``: thinking when the sample has a ``reasoning`` field).
        loss_reduction: ``"sqrt"`` (square-root normalised), ``"token"`` or ``"sample"``; the normaliser is
            global over the micro-batches of a step and over ranks.
        loss_chunk_size: Labelled tokens per chunk of the vocabulary projection.
        global_batch_balance: Take the MoE expert counts of the balance loss over the whole global batch
            (the loss's coefficient is the model config's ``router_aux_loss_coef``; 0 turns it off).
        compile: ``torch.compile`` the model's ``forward_hidden``.
        bf16: bf16 autocast: ``"auto"`` (on CUDA only), ``True`` or ``False``.
        context_parallel: Ranks each row's sequence is split over (``[train] context_parallel``; 1: none).
            Must divide the world size; the ranks of one CP group must be given the same batches
            (:mod:`vl_train.context_parallel`).
        expert_parallel: Ranks the MoE experts are sharded over (``[train] expert_parallel``; 1: none, else
            the world size; :func:`vl_moe.shard_experts`).
        distill: The distillation spec (stage ``Distill``), else ``None``.
    """

    stage: str = "custom"
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    max_length: int = 2048
    packing: bool = True
    thinking: Literal["auto", "on", "off"] = "auto"
    loss_reduction: LossReduction = "sqrt"
    loss_chunk_size: int = 4096
    global_batch_balance: bool = True
    compile: bool = False
    bf16: bool | Literal["auto"] = "auto"
    context_parallel: int = 1
    expert_parallel: int = 1
    distill: DistillSpec | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "micro_batch_size",
            "grad_accum_steps",
            "max_length",
            "loss_chunk_size",
            "context_parallel",
            "expert_parallel",
        ):
            _positive_int("TrainConfig", name, getattr(self, name), 1)
        if self.loss_reduction not in ("sqrt", "token", "sample"):
            raise ValueError(
                f"TrainConfig.loss_reduction must be 'sqrt', 'token' or 'sample', got {self.loss_reduction!r}"
            )
        if self.thinking not in ("auto", "on", "off"):
            raise ValueError(f"TrainConfig.thinking must be 'auto', 'on' or 'off', got {self.thinking!r}")
        if isinstance(self.distill, Mapping):
            self.distill = config_from_dict(DistillSpec, self.distill, "distillation")
