"""The demo's model and supervised stages: a tiny Qwen3-VL-style model trained (V0 ->) S0 -> S1 -> SFT.

The model is built from the suite's parts by ``vl_train.builders.build_model`` (vision tower + merger +
DeepStack + interleaved-MRoPE decoder, optionally with MoE text layers) with the demo tokenizer. Each
stage is a ``vl_train.stages`` preset with the demo's settings applied, trained by ``vl_train.Trainer``
on a ``MixtureSampler`` of per-task ``SyntheticDataset`` sources (counting and colour weighted up,
every task present). V0, the tower pretrained alone before S0, is in ``demo_vision``.

The settings below are **our choice**, tuned for a 2-core CPU (see ``examples/demo/README.md``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from demo_vision import TowerSpec

from vl_model.parts import PARTS, unfreeze
from vl_train import Trainer
from vl_train.builders import build_data, build_model
from vl_train.data.synthetic import TASK_NAMES
from vl_train.stages import stage
from vl_train.testing import TINY_TEXT, TINY_VISION

__all__ = [
    "DEFAULT_MIXTURE",
    "DemoSettings",
    "StageRun",
    "StageSpec",
    "build_demo_model",
    "default_stages",
    "run_stage",
]

DEFAULT_MIXTURE: dict[str, float] = {
    "count": 6.0,
    "colour": 4.0,
    "spatial": 1.0,
    "compare": 0.5,
    "caption": 1.0,
    "grounding": 0.5,
    "video_appear": 0.5,
    "video_move": 0.5,
    "text_math": 0.5,
}
"""Task -> sampling weight: the two target tasks dominate, every other task stays in the mixture."""


@dataclass
class StageSpec:
    """One supervised stage.

    Attributes:
        name: Short name (``"S0"``, ``"S1"``, ``"SFT"``), also the preset.
        steps: Optimiser steps.
        lr: Peak learning rate (the LLM; also the merger and tower unless set below).
        lr_vision: Peak learning rate of the tower (``None``: ``lr``).
        thinking: Fraction of samples carrying reasoning (rendered as ``<think>...</think>``).
        warmup_steps: Linear warm-up steps.
        lr_merger: Peak learning rate of the merger and DeepStack mergers (``None``: ``lr``).
    """

    name: str
    steps: int
    lr: float
    lr_vision: float | None = None
    thinking: float = 0.0
    warmup_steps: int = 10
    lr_merger: float | None = None


@dataclass
class DemoSettings:
    """Everything the demo's supervised part needs besides the output folder.

    Attributes:
        moe: Mixture-of-experts text layers.
        seed: Model init and data seed.
        text: ``VLTextConfig`` overrides.
        vision: ``VLVisionConfig`` overrides.
        max_pixels: Image budget of the processor.
        image_size_range: Smallest and largest image side of the synthetic data.
        grid: Cell side of the synthetic scenes (``patch_size * 2``: one shape per visual token; 0 free).
        mixture: Task -> sampling weight.
        micro_batch_size: Rows per step.
        max_length: Tokens per packed row.
        packing: Pack several samples per row (else one padded sample per row).
        stages: The supervised stages in order.
        data_size: Training samples per task source (each cycles).
        tower: V0, the tower pretrained alone before S0 (``demo_vision``; 0 steps skips it).
    """

    moe: bool = False
    seed: int = 0
    text: dict[str, Any] = field(
        default_factory=lambda: {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3}
    )
    vision: dict[str, Any] = field(
        default_factory=lambda: {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "patch_size": 16}
    )
    max_pixels: int = 128 * 128
    image_size_range: tuple[int, int] = (96, 128)
    grid: int = 32
    mixture: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIXTURE))
    micro_batch_size: int = 4
    max_length: int = 512
    packing: bool = True
    stages: list[StageSpec] = field(default_factory=lambda: default_stages())
    data_size: int = 50000
    tower: TowerSpec = field(default_factory=TowerSpec)


def default_stages(scale: float = 1.0) -> list[StageSpec]:
    """The demo's S0, S1 and SFT stages; ``scale`` multiplies every step count (at least 2 steps).

    The tower and merger come from V0 and train at 1e-5 from then on: at the LLM's rates, gradients
    through the still random LLM scramble the features V0 gave them. S1 trains the LLM at 1e-3: at 2e-3
    counting stalls near 80 % even on clean visual tokens (see the README's probe section, points 4-5).
    """
    steps = lambda n: max(2, round(n * scale))
    vision = {"lr_vision": 1e-5, "lr_merger": 1e-5}
    return [
        StageSpec("S0", steps(100), 3e-3, thinking=0.0, warmup_steps=min(10, steps(10)), **vision),
        StageSpec("S1", steps(3500), 1e-3, thinking=0.0, warmup_steps=min(20, steps(20)), **vision),
        StageSpec("SFT", steps(300), 1e-4, thinking=0.3, warmup_steps=min(10, steps(10)), **vision),
    ]


_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "decoder_sparse_step": 1}


def build_demo_model(settings: DemoSettings) -> tuple[Any, Any]:
    """``(model, processor)``: a fresh tiny model (MoE text layers with ``settings.moe``) and the demo processor."""
    text = {**TINY_TEXT, **settings.text}
    if settings.moe:
        text.update(_MOE)
    section = {
        "tokenizer": "demo",
        "seed": settings.seed,
        "max_pixels": settings.max_pixels,
        "text": text,
        "vision": {**TINY_VISION, **settings.vision},
    }
    return build_model(section)


@dataclass
class StageRun:
    """What one stage produced.

    Attributes:
        name: The stage.
        seconds: Wall time of the training.
        losses: Loss per step.
        output_dir: The stage's folder (metrics, loss curve).
    """

    name: str
    seconds: float
    losses: list[float]
    output_dir: Path


def _data_section(settings: DemoSettings, spec: StageSpec, stage_index: int) -> dict[str, Any]:
    unknown = sorted(set(settings.mixture) - set(TASK_NAMES))
    if unknown:
        raise ValueError(f"unknown tasks {unknown} in the mixture; tasks are {list(TASK_NAMES)}")
    sources = {
        task: {
            "kind": "synthetic",
            "tasks": [task],
            "size": settings.data_size,
            "seed": settings.seed * 100 + stage_index,
            "image_size_range": list(settings.image_size_range),
            "grid": settings.grid,
            "video_frames": [2, 4],
            "thinking": spec.thinking,
            "ratio": weight,
        }
        for task, weight in settings.mixture.items()
        if weight > 0
    }
    return {"sources": sources, "seed": settings.seed + stage_index, "shuffle_buffer": 64, "overlong": "drop"}


def run_stage(
    model: Any, processor: Any, settings: DemoSettings, spec: StageSpec, output_dir: Path, *, progress: bool = True
) -> StageRun:
    """Train ``model`` in place for one stage and return its losses and wall time.

    Raises:
        ValueError: An unknown stage preset or task in the mixture.
    """
    index = [s.name for s in settings.stages].index(spec.name) if spec in settings.stages else 0
    config = stage(spec.name).replace(
        optim={
            "lr": spec.lr,
            "lr_vision": spec.lr_vision if spec.lr_vision is not None else spec.lr,
            "lr_merger": spec.lr_merger,
            "warmup_steps": min(spec.warmup_steps, spec.steps - 1),
            "weight_decay": 0.0,
        },
        max_steps=spec.steps,
        max_length=settings.max_length,
        micro_batch_size=settings.micro_batch_size,
        packing=settings.packing,
        activation_checkpointing=False,
        seed=settings.seed,
        output_dir=str(output_dir),
        save_every=0,
        keep_last=1,
        tensorboard=False,
        plot=True,
        progress=progress,
        bf16=False,
    )
    batches = build_data(_data_section(settings, spec, index), processor, config)
    start = time.perf_counter()
    result = Trainer(model, config, batches).train()
    seconds = time.perf_counter() - start
    unfreeze(model, PARTS)  # Trainer froze the parts the stage does not train
    return StageRun(spec.name, seconds, list(result.losses), Path(result.output_dir))


def settings_dict(settings: DemoSettings) -> dict[str, Any]:
    """``settings`` as plain values (for the report)."""
    return dataclasses.asdict(settings)
