"""Stage presets of the Qwen3-VL training recipe as composable :class:`~vl_train.config.TrainConfig` values.

Implements the stages of the Qwen3-VL technical report (arXiv 2511.21631, sections 3-4; REFERENCE.md
section 4): merger-only alignment (S0), full multimodal pretraining (S1), 32K long context (S2), 256K
ultra-long context (S3), SFT at 32K then 256K, and strong-to-weak distillation of the LLM. Each preset
is a plain ``TrainConfig``; compose them with ``replace``, e.g. ``S1.replace(max_steps=500, optim={"lr": 5e-5})``,
and look them up by name with :func:`stage`.

The report gives trainable parts, sequence lengths and token budgets but not optimiser settings:
the learning rates and warm-ups below are **our choice** (LLaVA-style 1e-3 for a merger trained
alone; 2e-5 for full-model training with a 10x lower tower rate, as InternVL and Qwen2-VL do;
halved again for the long-context stages and SFT). ``max_steps`` is a placeholder: set it from the
token budget, ``tokens / (max_length * micro_batch_size * grad_accum_steps * world_size)``.

========= ====================== ======== ================ ======== ====== ======== ===== ========
preset    trainable              lr       lr_vision        max_len  pack   act. ckpt chunk warmup
========= ====================== ======== ================ ======== ====== ======== ===== ========
S0        merger, deepstack      1e-3     (frozen)         8192     yes    no       4096  200
S1        all                    2e-5     2e-6             8192     yes    no       4096  1000
S2        all                    1e-5     1e-6             32768    yes    yes      4096  200
S3        all                    1e-5     1e-6             262144   yes    yes      2048  200
SFT       all                    1e-5     1e-6             32768    yes    yes      4096  100
SFT_LONG  all                    5e-6     5e-7             262144   yes    yes      2048  50
Distill   llm                    1e-5     (frozen)         32768    yes    yes      4096  100
========= ====================== ======== ================ ======== ====== ======== ===== ========

All presets use the square-root-normalised loss (``loss_reduction="sqrt"``), AdamW with betas
(0.9, 0.95), weight decay 0.1 (0 for S0), cosine decay to 10 % and gradient clipping at 1.0. SFT
renders samples in the thinking format when they carry ``reasoning`` (``thinking="auto"``).

Distillation is configured by :func:`Distill`, whose :class:`DistillSpec` is stored in
``config.distill``: off-policy (``"ce"`` on teacher-written text, or ``"forward_kl"`` to the
teacher's distributions) or on-policy (the student samples; ``"reverse_kl"`` estimated on the sampled
tokens, or GKD's ``"jsd"`` with ``beta``). See :mod:`vl_train.distill`.

Notation: ``lr`` is the peak rate of parts without their own rate (merger and LLM here); S = stage.
"""

from __future__ import annotations

from typing import Any

from .config import DistillLoss, DistillMode, DistillSpec, OptimConfig, TrainConfig

__all__ = [
    "S0",
    "S1",
    "S2",
    "S3",
    "SFT",
    "SFT_LONG",
    "STAGES",
    "Distill",
    "DistillSpec",
    "distill_spec",
    "stage",
]


S0 = TrainConfig(
    stage="S0",
    trainable=("merger", "deepstack"),
    optim=OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=200),
    max_steps=10_000,
    max_length=8192,
    packing=True,
    loss_reduction="sqrt",
    output_dir="runs/s0",
)
"""Alignment: only the merger and DeepStack mergers train (tower and LLM frozen), 8K rows."""

S1 = TrainConfig(
    stage="S1",
    trainable=("vision", "merger", "deepstack", "llm"),
    optim=OptimConfig(lr=2e-5, lr_vision=2e-6, weight_decay=0.1, warmup_steps=1000),
    max_steps=100_000,
    max_length=8192,
    packing=True,
    loss_reduction="sqrt",
    output_dir="runs/s1",
)
"""Multimodal pretraining: every parameter trains, 8K rows."""

S2 = S1.replace(
    stage="S2",
    optim={"lr": 1e-5, "lr_vision": 1e-6, "warmup_steps": 200},
    max_length=32768,
    activation_checkpointing=True,
    output_dir="runs/s2",
)
"""Long context: 32K rows, activation checkpointing."""

S3 = S2.replace(stage="S3", max_length=262144, micro_batch_size=1, loss_chunk_size=2048, output_dir="runs/s3")
"""Ultra-long context: 256K packed rows, activation checkpointing, smaller loss chunks."""

SFT = S2.replace(stage="SFT", optim={"warmup_steps": 100}, max_steps=10_000, thinking="auto", output_dir="runs/sft")
"""Supervised fine-tuning at 32K, thinking and non-thinking formats by sample."""

SFT_LONG = SFT.replace(
    stage="SFT_LONG", optim={"lr": 5e-6, "lr_vision": 5e-7, "warmup_steps": 50}, max_length=262144,
    micro_batch_size=1, loss_chunk_size=2048, output_dir="runs/sft_long",
)  # fmt: skip
"""SFT's second phase at 256K, starting from the 32K SFT model."""


def Distill(
    mode: DistillMode = "off_policy",
    loss: DistillLoss | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    **overrides: Any,
) -> TrainConfig:
    """Strong-to-weak distillation of the LLM (tower and merger frozen).

    Args:
        mode: ``"off_policy"`` or ``"on_policy"``.
        loss: See :class:`DistillSpec`; None picks ``"ce"`` off-policy and ``"reverse_kl"`` on-policy.
        beta: JSD interpolation.
        temperature: Sampling and scoring temperature.
        max_new_tokens: On-policy sample length.
        **overrides: Further ``TrainConfig`` fields.

    Returns:
        A ``TrainConfig`` with ``stage="Distill"`` and the spec in ``distill``.
    """
    chosen: Any = loss if loss is not None else ("ce" if mode == "off_policy" else "reverse_kl")
    spec = DistillSpec(mode=mode, loss=chosen, beta=beta, temperature=temperature, max_new_tokens=max_new_tokens)
    base = SFT.replace(stage="Distill", trainable=("llm",), optim={"lr_vision": None}, output_dir="runs/distill")
    return base.replace(distill=spec, **overrides)


def distill_spec(config: TrainConfig) -> DistillSpec:
    """The :class:`DistillSpec` of a config (raises ``ValueError`` when it has none)."""
    if config.distill is None:
        raise ValueError(f"config of stage {config.stage!r} has no distillation spec; build it with Distill()")
    return config.distill


STAGES: dict[str, TrainConfig] = {
    "S0": S0,
    "S1": S1,
    "S2": S2,
    "S3": S3,
    "SFT": SFT,
    "SFT_LONG": SFT_LONG,
    "Distill": Distill(),
    "Distill_on_policy": Distill("on_policy"),
}
"""Every preset by name (``Distill`` is the off-policy default)."""


def stage(name: str, **overrides: Any) -> TrainConfig:
    """The preset called ``name`` (case-insensitive; ``-`` and ``_`` alike), with ``overrides`` applied.

    Raises:
        ValueError: An unknown name (the known ones are listed) or unknown override keys.
    """
    key = name.strip().lower().replace("-", "_")
    for known, config in STAGES.items():
        if known.lower() == key:
            return config.replace(**overrides) if overrides else config.replace()
    raise ValueError(f"unknown stage {name!r}; known stages are {list(STAGES)}")
