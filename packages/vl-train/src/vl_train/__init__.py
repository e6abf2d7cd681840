"""vl-train: staged training of Qwen3-VL-class models.

- ``TrainConfig`` (with its ``[optim]`` section ``OptimConfig``; ``RunConfig`` is what every trainer
  shares) and the stage presets ``S0`` .. ``S3``, ``SFT``, ``SFT_LONG``, ``Distill`` (``stage(name)``).
- ``TrainingLoop``: the run every trainer shares (freezing, AdamW with warm-up and cosine decay,
  per-part learning rates, clipping, NaN/inf steps skipped, FSDP2, atomic checkpoints with exact
  resume, JSONL/TensorBoard metrics, callbacks, a PNG); ``Trainer`` adds the supervised step:
  gradient accumulation with a global loss normaliser. Any ``vl_model.TrainableVLM`` trains
  (``VLForConditionalGeneration`` and composed models).
- ``lm_loss``: chunked vocabulary projection on labelled positions only, ``sqrt`` / ``token`` / ``sample``
  reductions normalised over the global batch; distillation losses in ``vl_train.distill_losses``.
- ``vl_train.data``: sample format, rendering with assistant-only labels, packing, mixtures, and the
  embedded ``SyntheticDataset``.
- ``vl_train.parallel``: FSDP2 (``parallelize``) and activation checkpointing applied by function;
  ``vl_train.context_parallel`` (Ulysses context parallelism on a dp x cp mesh), expert parallelism through
  ``vl_moe.shard_experts``, ``vl_train.dcp_checkpoint`` (sharded checkpoints, resumable on another world size).
- ``estimate_memory``: per-rank memory of a long-context step (weights, AdamW, activations, loss chunk);
  ``plan_memory`` (``vl-train plan``): per-GPU memory from the meta-device model x FSDP / CP / EP sizes.
- ``DistillTrainer``: on-policy (reverse KL / JSD) and off-policy distillation runs.
- ``token_logprobs`` / ``completion_logprobs``: log-probabilities of given tokens (distillation, RL).
- ``vl_train.builders``: model + processor, data mixture and batches from recipe sections; CLI
  ``vl-train RECIPE`` (``vl_train.recipe``; demo recipes ``demo_s0``, ``demo_s1``, ``demo_sft``,
  ``demo_distill`` with the tokenizer of :mod:`vl_train.testing`, for tests and examples).
"""

from .config import PARTS, OptimConfig, RunConfig, TrainConfig
from .distill import off_policy_distill_loss, on_policy_distill_step
from .distill_run import DistillTrainer
from .logprobs import completion_logprobs, token_logprobs
from .loop import TrainingLoop
from .losses import LossOutput, global_loss_normalizer, lm_loss, loss_normalizer, moe_aux_loss
from .memory import estimate_memory
from .plan import plan_memory
from .stages import S0, S1, S2, S3, SFT, SFT_LONG, Distill, DistillSpec, stage
from .teacher import generate_teacher_data
from .trainer import OutputDirError, Trainer, TrainResult

__version__ = "0.2.0"

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
    "OptimConfig",
    "OutputDirError",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingLoop",
    "__version__",
    "completion_logprobs",
    "estimate_memory",
    "generate_teacher_data",
    "global_loss_normalizer",
    "lm_loss",
    "loss_normalizer",
    "moe_aux_loss",
    "off_policy_distill_loss",
    "on_policy_distill_step",
    "plan_memory",
    "stage",
    "token_logprobs",
]
