"""Distillation runs from a recipe: the ``[teacher]`` section, prompt batches and a distilling ``Trainer``.

What ``vl-train`` does with ``preset = "Distill"`` (or ``"Distill_on_policy"``) and a ``[teacher]``
section (REFERENCE.md section 4, strong-to-weak distillation; :mod:`vl_train.distill`):

- off-policy, loss ``"ce"``: the teacher answers ``samples`` prompts drawn from ``[data]``
  (:func:`vl_train.teacher.generate_teacher_data`, adaptive repetition penalty), the answers are written
  to ``OUTPUT/teacher_data.jsonl``, and the student is fine-tuned on them (cross-entropy, like SFT);
- off-policy, loss ``"forward_kl"`` / ``"jsd"``: the student trains on ``[data]``'s own samples against
  the teacher's next-token distributions at every labelled position
  (:func:`vl_train.distill.off_policy_distill_loss`);
- on-policy, loss ``"reverse_kl"`` / ``"jsd"``: for each batch of prompts drawn from ``[data]`` the
  student samples ``max_new_tokens`` tokens and minimises the per-token reverse KL (or GKD's JSD(beta))
  to the teacher on them (:func:`vl_train.distill.sample_completions` +
  :func:`~vl_train.distill.sampled_distill_loss`).

The losses use the config's ``loss_reduction`` with a normaliser global over the step's micro-batches
and data-parallel ranks, so gradient accumulation and FSDP2 ranks give the one-big-batch gradient.
Teacher and student share the tokenizer. Under ``torchrun`` the student is sharded like the ``Trainer``'s
(ranks may hold different modalities), the frozen teacher is replicated on every rank (it runs no
collective), on-policy sampling runs with ``synced_gpus`` (every rank runs every forward of the sharded
student), and the ``"ce"`` mode's teacher data are written by rank 0. Context parallelism is not supported.

Notation: ``B`` prompts per batch, ``P`` longest prompt (left-padded), ``T`` sampled tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import DistillSpec, TrainConfig
from .data.messages import prompt_inputs
from .distill import model_inputs, off_policy_distill_loss, sample_completions, sampled_distill_loss
from .losses import IGNORE_INDEX, global_loss_normalizer, loss_normalizer
from .parallel import barrier, is_main_process, root_forward, sum_over_ranks, world_size
from .stages import distill_spec
from .trainer import Trainer, TrainResult

__all__ = ["TEACHER_KEYS", "DistillTrainer", "PromptBatches", "check_teacher", "run_distill", "teacher_spec"]

TEACHER_KEYS = {
    "model",
    "mode",
    "loss",
    "beta",
    "temperature",
    "max_new_tokens",
    "samples",
    "base_penalty",
    "short_penalty",
}


def teacher_spec(section: Mapping[str, Any], base: DistillSpec) -> DistillSpec:
    """The run's :class:`~vl_train.stages.DistillSpec`: the preset's, with the ``[teacher]`` section's fields.

    Raises:
        ValueError: Unknown keys in ``[teacher]`` (named, the known ones listed), no ``model`` in it, or an
            invalid spec (a loss the mode does not support, ``beta`` outside ``[0, 1]``, ...).
    """
    unknown = sorted(set(section) - TEACHER_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in [teacher]; known keys are {sorted(TEACHER_KEYS)}")
    if not section.get("model"):
        raise ValueError("[teacher] needs model = a model folder (or a previous vl-train run's output folder)")
    fields = {k: section[k] for k in ("mode", "loss", "beta", "temperature", "max_new_tokens") if k in section}
    if "mode" in fields and "loss" not in fields and fields["mode"] != base.mode:
        fields["loss"] = "ce" if fields["mode"] == "off_policy" else "reverse_kl"
    return DistillSpec(**{**base.to_dict(), **fields})


class PromptBatches(Iterator[dict[str, torch.Tensor]]):
    """Endless batches of ``rows`` left-padded prompts from a sample stream (the final assistant turn dropped).

    Checkpointable when the stream is (``state_dict`` / ``load_state_dict`` pass through), so a resumed
    run draws the same prompts.

    Args:
        samples: An endless sample iterator, e.g. a :class:`~vl_train.data.mixture.MixtureSampler`.
        processor: Encodes each prompt (:func:`vl_train.data.messages.prompt_inputs`) and left-pads
            them (``VLProcessor.pad_prompts``).
        rows: Prompts per batch.
    """

    def __init__(self, samples: Iterator[Mapping[str, Any]], processor: Any, rows: int) -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.samples, self.processor, self.rows = samples, processor, rows

    def __next__(self) -> dict[str, torch.Tensor]:
        prompts = [prompt_inputs(self.processor, next(self.samples)) for _ in range(self.rows)]
        return self.processor.pad_prompts(prompts)

    def state_dict(self) -> Any:
        """The sample stream's state (``None`` when it has none)."""
        get = getattr(self.samples, "state_dict", None)
        return get() if callable(get) else None

    def load_state_dict(self, state: Any) -> None:
        """Restore the sample stream's state."""
        self.samples.load_state_dict(state)  # type: ignore[attr-defined]


class DistillTrainer(Trainer):
    """A :class:`~vl_train.trainer.Trainer` whose step loss is a distillation loss to a frozen teacher.

    On-policy (``config.distill.mode == "on_policy"``) the batches are prompts
    (:class:`PromptBatches`); off-policy they are training batches (``labels``) and the loss is the
    forward KL / JSD to the teacher's distributions. Other arguments as for ``Trainer``.

    Args:
        model: The student.
        teacher: The teacher, same vocabulary; frozen here and kept in eval mode.
        config: The run's settings, with a ``distill`` spec (:func:`vl_train.stages.Distill`).
        train_batches: Prompt batches (on-policy) or labelled batches (off-policy).
        **kwargs: As for :class:`~vl_train.trainer.Trainer`.

    Raises:
        ValueError: The spec is off-policy ``"ce"`` (use the plain ``Trainer`` on teacher-written data), the
            vocabularies differ, or context parallelism is configured.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        config: TrainConfig,
        train_batches: Iterator[dict[str, Any]],
        **kwargs: Any,
    ) -> None:
        if config.context_parallel > 1:
            raise ValueError("distillation does not support context_parallel > 1; set [train] context_parallel = 1")
        self.spec = distill_spec(config)
        if self.spec.mode == "off_policy" and self.spec.loss == "ce":
            raise ValueError("off-policy 'ce' distillation is SFT on teacher-written data: use Trainer")
        student_vocab = model.output_weight().shape[0]  # type: ignore[operator]
        teacher_vocab = teacher.output_weight().shape[0]  # type: ignore[operator]
        if student_vocab != teacher_vocab:
            raise ValueError(f"teacher vocabulary {teacher_vocab} differs from the student's {student_vocab}")
        self.teacher = teacher.requires_grad_(False).eval()
        super().__init__(model, config, train_batches, **kwargs)
        self.teacher.to(self.device)  # the frozen teacher runs where the student trains

    def accumulate(self, micro: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of the step's micro-batches with the distillation loss; returns ``(loss, 0)``.

        The loss is summed over micro-batches and ranks (float64); each rank's backward is scaled by the
        world size because FSDP2 averages gradients while the global normaliser wants their sum.
        """
        world = world_size()
        losses = self._on_policy_losses(micro) if self.spec.mode == "on_policy" else self._off_policy_losses(micro)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for loss_of in losses:
            loss = root_forward(self.model, loss_of)
            (loss * world).backward()
            total += loss.detach().double()
        return sum_over_ranks(total), torch.zeros_like(total)

    def _loss_options(self, normalizer: torch.Tensor) -> dict[str, Any]:
        spec, cfg = self.spec, self.config
        return {
            "loss": spec.loss,
            "beta": spec.beta,
            "temperature": spec.temperature,
            "reduction": cfg.loss_reduction,
            "normalizer": normalizer,
            "chunk_size": cfg.loss_chunk_size,
        }

    def _on_policy_losses(self, micro: Sequence[dict[str, Any]]) -> list[Callable[[], torch.Tensor]]:
        """The student samples every micro-batch first (the global normaliser counts all completions)."""
        spec, world = self.spec, world_size()
        kw: dict[str, Any] = {"max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature}
        sampled = [sample_completions(self.model, b, synced_gpus=world > 1, **kw) for b in micro]
        targets = [torch.where(mask, 0, IGNORE_INDEX) for _, mask in sampled]
        options = self._loss_options(
            global_loss_normalizer([loss_normalizer(t, None, self.config.loss_reduction) for t in targets])
        )

        def loss_of(batch: dict[str, Any], sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return sampled_distill_loss(self.model, self.teacher, batch, sequences, mask, **options).loss

        return [functools.partial(loss_of, b, q, m) for b, (q, m) in zip(micro, sampled, strict=True)]

    def _off_policy_losses(self, micro: Sequence[dict[str, Any]]) -> list[Callable[[], torch.Tensor]]:
        """The teacher's logits at each micro-batch's labelled positions, computed in its loss closure."""
        segments = [b["segment_ids"][:, 1:] if b.get("segment_ids") is not None else None for b in micro]
        normalizers = [
            loss_normalizer(b["labels"][:, 1:], s, self.config.loss_reduction)
            for b, s in zip(micro, segments, strict=True)
        ]
        options = self._loss_options(global_loss_normalizer(normalizers))

        def loss_of(batch: dict[str, Any]) -> torch.Tensor:
            keep = batch["labels"][:, 1:] != IGNORE_INDEX
            with torch.no_grad():
                hidden = self.teacher.forward_hidden(**model_inputs(batch)).last_hidden_state[:, :-1][keep]  # type: ignore[operator]
                teacher_logits = (hidden @ self.teacher.output_weight().T).float()  # type: ignore[operator]
            return off_policy_distill_loss(self.model, batch, teacher_logits, **options).loss

        return [functools.partial(loss_of, b) for b in micro]


def check_teacher(recipe: Mapping[str, Any], config: TrainConfig) -> bool:
    """Whether the recipe distils (a ``distill`` spec in its config); its ``[teacher]`` section is checked.

    Raises:
        ValueError: ``[teacher]`` without a distillation preset, a distillation preset without ``[teacher]``,
            or a bad ``[teacher]`` section (see :func:`teacher_spec`).
    """
    if config.distill is None:
        if "teacher" in recipe:
            raise ValueError(f"[teacher] is only used with preset = 'Distill', not {config.stage!r}")
        return False
    if "teacher" not in recipe:
        raise ValueError("preset 'Distill' needs a [teacher] section with model = the teacher's folder")
    teacher_spec(dict(recipe["teacher"]), distill_spec(config))
    return True


def run_distill(
    recipe: Mapping[str, Any],
    config: TrainConfig,
    model: nn.Module,
    processor: Any,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Run the distillation a recipe describes (``preset`` Distill, a ``[teacher]`` section); see the module doc.

    Args:
        recipe: The checked recipe (``[teacher]``, ``[data]``).
        config: Its ``TrainConfig`` (with a ``distill`` spec).
        model: The student.
        processor: The student's (and teacher's) processor.
        resume: Continue from the latest valid checkpoint in the output folder.
        overwrite: Start afresh in an output folder that holds another run.

    Raises:
        ValueError: A bad ``[teacher]`` section (see :func:`teacher_spec`) or a teacher that does not fit.
        FileNotFoundError: No model in the teacher folder.
    """
    from .builders import build_data, build_mixture, check_processor, load_model
    from .context_parallel import DataParallelBatches
    from .teacher import generate_teacher_data

    section = dict(recipe.get("teacher") or {})
    spec = teacher_spec(section, distill_spec(config))
    config = config.replace(distill=spec)
    teacher = load_model(str(section["model"])).to(next(model.parameters()).device)
    check_processor(teacher, processor)
    data = dict(recipe.get("data", {}))

    def shared(batches: Any) -> Any:  # under torchrun each rank takes its share of the one stream
        return DataParallelBatches(batches) if world_size() > 1 else batches

    if spec.mode == "on_policy":
        prompts = shared(PromptBatches(build_mixture(data, config), processor, config.micro_batch_size))
        return DistillTrainer(model, teacher, config, prompts, resume=resume, overwrite=overwrite).train()
    if spec.loss != "ce":
        return DistillTrainer(
            model, teacher, config, shared(build_data(data, processor, config)), resume=resume, overwrite=overwrite
        ).train()
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    mixture = build_mixture(data, config)
    samples = [next(mixture) for _ in range(int(section.get("samples", 64)))]
    penalties: dict[str, Any] = {k: float(section[k]) for k in ("base_penalty", "short_penalty") if k in section}
    jsonl = output / "teacher_data" / "teacher_data.jsonl"
    if is_main_process():  # the teacher is replicated: one rank writes the data, every rank reads them
        generate_teacher_data(
            teacher, processor, samples, max_new_tokens=spec.max_new_tokens, output=jsonl, **penalties
        )
    barrier()
    sft_data = {"kind": "jsonl", "path": str(jsonl), "seed": data.get("seed", config.seed)}
    batches = shared(build_data(sft_data, processor, config))
    return Trainer(model, config, batches, resume=resume, overwrite=overwrite).train()
