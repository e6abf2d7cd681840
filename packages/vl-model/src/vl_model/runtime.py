"""The model interface every trainer, parallelism function, rollout and distillation step uses.

Two model classes build a VLM in this package: the core ``VLForConditionalGeneration`` (Qwen3-VL's
own decoder) and ``ComposedVLForConditionalGeneration`` (our tower + any Hugging Face causal LM).
Training code never reaches into either layout; it asks the model, through :class:`TrainableVLM`:

- ``forward_hidden(...)``: the decoder's last hidden states ``[B, L, H]`` (and the MoE router logits)
  for the usual inputs, packed rows (``segment_ids``) included; the vocabulary projection is left
  to the caller, who projects only the positions it needs (``vl_train.lm_loss``);
- ``output_weight()``: the output projection ``[V, H]`` (read it inside the FSDP root's forward);
- ``decoder_layers()`` / ``vision_tower()``: the blocks that parallelism shards and checkpoints;
- ``part_modules(part)``: what each of ``PARTS`` holds, for freezing and per-part learning rates;
- ``moe_routing()``: experts, experts per token and the balance-loss coefficient, or ``None``.

``isinstance(model, TrainableVLM)`` checks the methods are there (a structural check). Both classes also
have ``uniform_vision_pass`` (default False; ``vl_train.parallel.parallelize`` turns it on): every fresh
forward then runs the vision tower exactly once, images and videos together, or a zero-weighted
placeholder image when the batch has no pixels, so that the ranks of a sharded tower run the same
collectives (``vl_model._vision_pass``).

Notation: ``B`` batch, ``L`` sequence, ``H`` hidden size, ``V`` vocabulary, ``E`` experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["PARTS", "HiddenStates", "MoERouting", "SequenceParallel", "TrainableVLM", "segment_positions"]

PARTS = ("vision", "merger", "deepstack", "llm")
"""The parts of a VLM: tower (``vision``), merge head (``merger``), DeepStack mergers, language model."""

MERGE_HEAD = ("merger", "post_layernorm", "downsample")
"""Tower children that form the merge head (``post_layernorm`` / ``downsample``: a GLM tower)."""


@dataclass
class HiddenStates:
    """What ``forward_hidden`` returns.

    Attributes:
        last_hidden_state: ``[B, L, H]`` after the decoder's final norm.
        router_logits: One ``[B * L, E]`` tensor per MoE layer when asked for, else ``None``.
    """

    last_hidden_state: torch.Tensor
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class MoERouting:
    """How a model routes tokens to experts (for the load-balancing loss).

    Attributes:
        num_experts: ``E``.
        top_k: Experts per token.
        aux_coef: Coefficient of the balance loss (the model config's ``router_aux_loss_coef``).
    """

    num_experts: int
    top_k: int
    aux_coef: float


@runtime_checkable
class TrainableVLM(Protocol):
    """The methods training code may call on a VLM (see the module docstring)."""

    def forward_hidden(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        output_router_logits: bool = False,
    ) -> HiddenStates:
        """Last hidden states of the decoder for one batch (no cache, no logits)."""
        ...

    def output_weight(self) -> torch.Tensor:
        """The output projection ``[V, H]`` (tied to the input embeddings when the model ties them)."""
        ...

    def decoder_layers(self) -> nn.ModuleList:
        """The language model's decoder layers, in order."""
        ...

    def vision_tower(self) -> nn.Module:
        """The vision tower (``blocks``, ``merger``, ``deepstack_merger_list``)."""
        ...

    def part_modules(self, part: str) -> list[nn.Module | nn.Parameter]:
        """The modules (and loose parameters) of one of :data:`PARTS`."""
        ...

    def moe_routing(self) -> MoERouting | None:
        """The MoE routing of the language model, ``None`` for a dense one."""
        ...


@runtime_checkable
class SequenceParallel(Protocol):
    """How a decoder runs one row's sequence sharded over the ranks of a group (context parallelism).

    The model computes everything that needs the whole row first (embeddings, visual scatter, MRoPE
    positions with their per-sample resets, the packed attention mask), then keeps its own contiguous
    part ``[start, stop)`` of the sequence for the decoder layers, and runs attention through
    :meth:`attention`, which sees the whole sequence (``vl_train.context_parallel`` implements it with
    Ulysses all-to-alls over heads). The last hidden states are this part's.
    """

    def bounds(self, length: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's part of a sequence of ``length`` positions."""
        ...

    def attention(self, attend: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a transformers attention function (``attend(module, q, k, v, mask, **kw)``) for local parts."""
        ...


def check_part(part: str) -> None:
    """Raise ``ValueError`` naming ``part`` and the known parts when it is not one of :data:`PARTS`."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; the parts are {list(PARTS)}")


def tower_parts(tower: nn.Module, part: str) -> list[nn.Module | nn.Parameter]:
    """``vision`` / ``merger`` / ``deepstack`` modules of a vision tower (see :data:`MERGE_HEAD`)."""
    if part == "deepstack":
        found = getattr(tower, "deepstack_merger_list", None)
        return [found] if isinstance(found, nn.Module) else []
    if part == "merger":
        return [m for name in MERGE_HEAD if isinstance(m := getattr(tower, name, None), nn.Module)]
    skip = {"deepstack_merger_list", *MERGE_HEAD}
    out: list[nn.Module | nn.Parameter] = [child for name, child in tower.named_children() if name not in skip]
    out.extend(p for _, p in tower.named_parameters(recurse=False))
    return out


def moe_routing_of(config: Any) -> MoERouting | None:
    """The routing of a (text) config with ``num_experts`` / ``num_experts_per_tok``, else ``None``."""
    experts = int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0) or 0)
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    if experts < 2 or top_k < 1:
        return None
    return MoERouting(experts, top_k, float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0))


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` position of every token inside its run of equal segment ids (0 at each run's start).

    Padding runs (negative ids) restart at 0 too, so that a decoder that detects packed samples from
    position restarts (transformers' masking) keeps them apart from the last sample.
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, L], got shape {tuple(segment_ids.shape)}")
    length = segment_ids.shape[1]
    index = torch.arange(length, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - run_start


class CoreRuntime:
    """:class:`TrainableVLM` for ``VLForConditionalGeneration`` (``model.visual``, ``model.language_model``, ``lm_head``)."""

    model: Any
    lm_head: Any
    config: Any

    def forward_hidden(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        output_router_logits: bool = False,
    ) -> HiddenStates:
        """See :meth:`TrainableVLM.forward_hidden`."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            segment_ids=segment_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            output_router_logits=output_router_logits,
            return_dict=True,  # whatever the config says: the fields are read by name
        )
        logits = tuple(out.router_logits) if output_router_logits and out.router_logits else None
        return HiddenStates(out.last_hidden_state, logits)

    @property
    def uniform_vision_pass(self) -> bool:
        """Run the tower in every fresh forward, a zero-weighted placeholder without pixels (for sharded towers).

        ``vl_train.parallel.parallelize`` turns it on, so that ranks holding text-only, image and video
        batches make the same collectives. Generation then encodes the pixels inside the prefill forward.
        """
        return bool(self.model.uniform_vision_pass)

    @uniform_vision_pass.setter
    def uniform_vision_pass(self, value: bool) -> None:
        self.model.uniform_vision_pass = bool(value)

    def _supports_mm_encoder_outputs(self) -> bool:
        # generate's pre-encoding runs the tower once per modality and not at all without pixels: with a
        # sharded tower the pixels go into the prefill forward instead (one pass, placeholder when none)
        return not self.uniform_vision_pass and bool(super()._supports_mm_encoder_outputs())  # type: ignore[misc]

    def output_weight(self) -> torch.Tensor:
        """See :meth:`TrainableVLM.output_weight`."""
        return self.lm_head.weight

    def decoder_layers(self) -> nn.ModuleList:
        """See :meth:`TrainableVLM.decoder_layers`."""
        return self.model.language_model.layers

    def vision_tower(self) -> nn.Module:
        """See :meth:`TrainableVLM.vision_tower`."""
        return self.model.visual

    def part_modules(self, part: str) -> list[nn.Module | nn.Parameter]:
        """See :meth:`TrainableVLM.part_modules` (``llm``: the decoder and ``lm_head``)."""
        check_part(part)
        if part == "llm":
            return [self.model.language_model, self.lm_head]
        return tower_parts(self.vision_tower(), part)

    def moe_routing(self) -> MoERouting | None:
        """See :meth:`TrainableVLM.moe_routing`."""
        return moe_routing_of(self.config.text_config)

    def set_sequence_parallel(self, sequence_parallel: SequenceParallel | None) -> None:
        """Run the decoder on this rank's part of every sequence (``None``: the whole sequence again).

        ``forward_hidden`` then returns ``[B, stop - start, H]``, the part ``sequence_parallel.bounds(L)``.
        """
        text = self.model.language_model
        text.sequence_parallel = sequence_parallel
        for layer in text.layers:
            layer.self_attn.sequence_parallel = sequence_parallel
