"""The training configuration: one keyword-only dataclass shared by the trainer, the stage presets and the CLI.

Stage presets (``vl_train.stages``) are ``TrainConfig`` values; recipe files and command-line
overrides are applied with :meth:`TrainConfig.from_dict` / :meth:`TrainConfig.replace`, which
reject unknown keys by name. The stages follow the Qwen3-VL recipe (REFERENCE.md section 4).

Notation: "parts" are ``vision`` (tower blocks and embeddings), ``merger``, ``deepstack`` (DeepStack
mergers) and ``llm`` (decoder and LM head), as in ``vl_model.parts``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["PARTS", "LossReduction", "TrainConfig"]

PARTS = ("vision", "merger", "deepstack", "llm")
LossReduction = Literal["sqrt", "token", "sample"]


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run needs besides the model and the data.

    Attributes:
        stage: Name of the preset this config came from (``"S0"``, ``"S1"``, ..., ``"custom"``).
        trainable: Parts that train; the others are frozen.
        lr: Peak learning rate of every trainable part without its own rate.
        lr_vision: Peak learning rate of the tower (``None``: ``lr``).
        lr_merger: Peak learning rate of the merger and DeepStack mergers (``None``: ``lr``).
        lr_llm: Peak learning rate of the language model (``None``: ``lr``).
        weight_decay: AdamW decoupled weight decay (not applied to biases and norms).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Linear warm-up steps from 0 to the peak rate.
        max_steps: Optimiser steps of the run.
        min_lr_ratio: Cosine decay ends at ``min_lr_ratio * peak``.
        micro_batch_size: Rows per forward pass.
        grad_accum_steps: Micro-batches per optimiser step.
        max_length: Tokens per row (packed rows are filled up to it).
        packing: Pack samples into rows (positions restart and attention stays within each sample).
        thinking: Render assistant turns in the thinking format (``"on"``), without it (``"off"``),
            or by sample (``"auto"``: thinking when the sample has a ``reasoning`` field).
        loss_reduction: ``"sqrt"`` (square-root normalised), ``"token"`` or ``"sample"``; the normaliser is
            global over the micro-batches of a step and over ranks.
        loss_chunk_size: Labelled tokens per chunk of the vocabulary projection.
        moe_aux_coef: Coefficient of the MoE load-balancing loss (0 disables it).
        global_batch_balance: Take the MoE expert counts over the whole global batch.
        max_grad_norm: Clip the gradient norm to this (``None``: no clipping).
        activation_checkpointing: Recompute decoder layers and tower blocks in the backward pass.
        compile: ``torch.compile`` the model.
        bf16: bf16 autocast: ``"auto"`` (on CUDA only), ``True`` or ``False``.
        max_nan_steps: Consecutive steps with a non-finite loss that are skipped before the run stops.
        seed: Seed of the model init, data order and dropout.
        output_dir: Where checkpoints, metrics and plots go (checked writable before training).
        log_every: Log metrics every this many steps.
        save_every: Write a checkpoint every this many steps (0: only at the end).
        keep_last: Checkpoints kept on disk.
        tensorboard: Also write TensorBoard event files (needs ``tensorboard``).
        plot: Write a loss-curve PNG at the end (needs ``matplotlib``).
        progress: Show a progress bar.
    """

    stage: str = "custom"
    trainable: tuple[str, ...] = PARTS
    lr: float = 1e-5
    lr_vision: float | None = None
    lr_merger: float | None = None
    lr_llm: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    max_steps: int = 100
    min_lr_ratio: float = 0.1
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    max_length: int = 2048
    packing: bool = True
    thinking: Literal["auto", "on", "off"] = "auto"
    loss_reduction: LossReduction = "sqrt"
    loss_chunk_size: int = 4096
    moe_aux_coef: float = 1e-3
    global_batch_balance: bool = True
    max_grad_norm: float | None = 1.0
    activation_checkpointing: bool = False
    compile: bool = False
    bf16: bool | Literal["auto"] = "auto"
    max_nan_steps: int = 3
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = 1
    save_every: int = 0
    keep_last: int = 2
    tensorboard: bool = True
    plot: bool = True
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.trainable = tuple(self.trainable)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        unknown = [p for p in self.trainable if p not in PARTS]
        if unknown:
            raise ValueError(f"TrainConfig.trainable has unknown parts {unknown}; parts are {list(PARTS)}")
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "max_length", "loss_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "save_every", "log_every", "max_nan_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative int, got {value!r}")
        if self.loss_reduction not in ("sqrt", "token", "sample"):
            raise ValueError(
                f"TrainConfig.loss_reduction must be 'sqrt', 'token' or 'sample', got {self.loss_reduction!r}"
            )
        if self.thinking not in ("auto", "on", "off"):
            raise ValueError(f"TrainConfig.thinking must be 'auto', 'on' or 'off', got {self.thinking!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")

    def part_lr(self, part: str) -> float:
        """Peak learning rate of one part (its own rate, else ``lr``)."""
        own = {"vision": self.lr_vision, "merger": self.lr_merger, "deepstack": self.lr_merger, "llm": self.lr_llm}
        if part not in own:
            raise ValueError(f"unknown part {part!r}; parts are {list(PARTS)}")
        value = own[part]
        return self.lr if value is None else value

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain values (``TrainConfig.from_dict(cfg.to_dict()) == cfg``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping of field names; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(data))

    def replace(self, **overrides: Any) -> TrainConfig:
        """A copy with ``overrides`` applied (unknown keys raise ``ValueError`` naming them)."""
        return self.from_dict({**self.to_dict(), **overrides})
