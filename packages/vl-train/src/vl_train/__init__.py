"""vl-train: staged training of Qwen3-VL-class models.

- ``TrainConfig`` and the stage presets ``S0`` .. ``S3``, ``SFT``, ``SFT_LONG``, ``Distill`` (``stage(name)``).
- ``Trainer``: gradient accumulation with a global loss normaliser, AdamW with warm-up and cosine decay,
  clipping, per-part learning rates, NaN/inf steps skipped, atomic checkpoints with exact resume,
  JSONL/TensorBoard metrics, a loss-curve PNG.
- ``lm_loss``: chunked vocabulary projection on labelled positions only, ``sqrt`` / ``token`` / ``sample``
  reductions normalised over the global batch; distillation losses in ``vl_train.distill_losses``.
- ``vl_train.data``: sample format, rendering with assistant-only labels, packing, mixtures, and the
  embedded ``SyntheticDataset``.
- ``vl_train.parallel``: FSDP2 (``parallelize``) and activation checkpointing applied by function.
- ``estimate_memory``: per-rank memory of a long-context step (weights, AdamW, activations, loss chunk).
- ``DistillTrainer``: on-policy (reverse KL / JSD) and off-policy distillation runs.
- CLI ``vl-train RECIPE`` (packaged demo recipes ``demo_s0``, ``demo_s1``, ``demo_sft``, ``demo_distill``).
"""

from .config import PARTS, TrainConfig
from .distill import off_policy_distill_loss, on_policy_distill_step
from .distill_run import DistillTrainer
from .losses import LossOutput, global_loss_normalizer, lm_loss, loss_normalizer, moe_aux_loss
from .memory import estimate_memory
from .stages import S0, S1, S2, S3, SFT, SFT_LONG, Distill, DistillSpec, stage
from .teacher import generate_teacher_data
from .trainer import OutputDirError, Trainer, TrainResult

__version__ = "0.1.0"

__all__ = [
    "PARTS",
    "S0",
    "S1",
    "S2",
    "S3",
    "SFT",
    "SFT_LONG",
    "Distill",
    "DistillSpec",
    "DistillTrainer",
    "LossOutput",
    "OutputDirError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "__version__",
    "estimate_memory",
    "generate_teacher_data",
    "global_loss_normalizer",
    "lm_loss",
    "loss_normalizer",
    "moe_aux_loss",
    "off_policy_distill_loss",
    "on_policy_distill_step",
    "stage",
]
