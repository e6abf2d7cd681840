"""Context parallelism: the sequence of a (packed) row sharded over a CP group, Ulysses-style.

The long-context stages (S2 at 32K, S3 at 256K tokens; REFERENCE.md section 4) need the activations of
one row split across GPUs. This module splits the decoder's sequence over the ``C`` ranks of a CP group
with DeepSpeed-Ulysses (Jacobs et al., arXiv 2309.14509; as verl does): every rank runs the decoder
layers on its contiguous ``L / C`` positions, and around attention an all-to-all trades the sequence
split for a head split, so attention itself sees the whole sequence for ``N / C`` of the heads, with
the unchanged attention function and mask (SDPA with the packed block-causal mask, FlashAttention
varlen, eager). Everything that needs the whole row is computed before the split, by the model, on
every CP rank: token embeddings, MRoPE positions with their per-sample resets, the packed mask. The
vision tower runs data-parallel across the CP group: each rank encodes a share of the row's images
and videos (balanced by patches), and an all-gather hands every rank all the visual tokens.

Why Ulysses and not PyTorch's ring attention (``torch.distributed.tensor.experimental.context_parallel``):
it runs on gloo (``all_to_all`` works there, so CPU tests compare it with one process), keeps any mask
(packed rows need a block-causal mask; the ring implementation supports only plain causal SDPA on
CUDA) and any attention backend. Its limits: ``C`` must divide the query heads (key/value heads are
repeated when ``C`` does not divide them), and each rank holds the whole sequence inside attention
(for a few heads).

Composition with FSDP2 (``vl_train.parallel.parallelize(context_parallel=C)``): the ``W`` ranks form a
2-D mesh ``(dp, cp) = (W / C, C)``; FSDP2 shards parameters over the flattened mesh (CP ranks hold
different tokens, so their gradients are summed like data-parallel ones), Ulysses and the tower use
the ``cp`` dimension. The ranks of one CP group must be given the same batches (shard the data by
:func:`data_parallel_rank` of :func:`data_parallel_size`).

The loss (:class:`ContextParallel`): each rank scores its part of the targets; per-token weights come
from the whole samples (a sample cut by a part boundary keeps its ``n_j``), and each CP rank adds
``1 / C`` of the row's normaliser, so the sum over ranks is one process's loss.

Notation: ``C`` CP size, ``c`` this rank in the CP group, ``B`` rows, ``L`` positions (a multiple of ``C``),
``N`` query heads, ``K`` key/value heads, ``D`` head dim, ``E`` LLM width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .losses import IGNORE_INDEX, SampleLayout, sample_layout

__all__ = [
    "ContextParallel",
    "DataParallelBatches",
    "UlyssesAttention",
    "apply_context_parallel",
    "context_parallel_of",
    "data_parallel_rank",
    "data_parallel_size",
    "shard_vision_tower",
]

_ATTR = "_vl_train_context_parallel"

PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "segment_ids": -1, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
"""What fills the positions added to make a row's length a multiple of ``C`` (padding: never scored)."""


class _AllToAll(torch.autograd.Function):
    """``out[j] = x[c]`` of rank ``j`` for ``x [C, ...]``; the backward is the same exchange of the gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()  # before empty_like, which would copy a permuted view's strides
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def _exchange(x: torch.Tensor, group: Any) -> torch.Tensor:
    out: torch.Tensor = _AllToAll.apply(x, group)
    return out


class _AllGather(torch.autograd.Function):
    """``[C, ...]``: every rank's ``x``; the backward sums each rank's gradient of our ``x`` (an all-to-all)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group), *x.shape))
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllToAll.apply(grad, ctx.group).sum(0), None


class _Heads:
    """An attention module seen with other head counts: transformers' functions read ``num_key_value_groups``."""

    def __init__(self, module: nn.Module, groups: int) -> None:
        self._module = module
        self.num_key_value_groups = groups

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _heads_to_sequence_split(x: torch.Tensor, size: int, group: Any) -> torch.Tensor:
    """``[B, N, L / C, D]`` (all heads, our positions) -> ``[B, N / C, L, D]`` (our heads, all positions)."""
    b, n, part, d = x.shape
    chunks = x.reshape(b, size, n // size, part, d).permute(1, 0, 2, 3, 4)  # [C (head group), B, N/C, L/C, D]
    got = _exchange(chunks, group)  # [C (source rank = sequence part), B, N/C, L/C, D]
    return got.permute(1, 2, 0, 3, 4).reshape(b, n // size, size * part, d)


def _sequence_to_heads_split(x: torch.Tensor, size: int, group: Any) -> torch.Tensor:
    """``[B, L, N / C, D]`` (attention output: our heads, all positions) -> ``[B, L / C, N, D]``."""
    b, length, heads, d = x.shape
    part = length // size
    chunks = x.reshape(b, size, part, heads, d).permute(1, 0, 2, 3, 4)  # [C (sequence part), B, L/C, N/C, D]
    got = _exchange(chunks, group)  # [C (source rank = head group), B, L/C, N/C, D]
    return got.permute(1, 2, 0, 3, 4).reshape(b, part, size * heads, d)


def _divisible_heads(key: torch.Tensor, value: torch.Tensor, queries: int, size: int) -> tuple[torch.Tensor, ...]:
    """Repeat key/value heads (grouped-query attention) until ``C`` divides them, keeping each group's pairing."""
    heads = key.shape[1]
    if heads % size == 0:
        return key, value
    wanted = heads * size // math.gcd(heads, size)  # the least multiple of both
    if queries % wanted:
        raise ValueError(
            f"context parallelism over {size} ranks splits attention heads: {queries} query and {heads} key/value "
            f"heads cannot be split evenly (the CP size must divide the query heads)"
        )
    repeat = wanted // heads
    return key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)


class UlyssesAttention:
    """Sequence parallelism of a decoder over one CP group (a :class:`vl_model.runtime.SequenceParallel`).

    Args:
        group: The CP process group (``C`` ranks holding the same rows).
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def bounds(self, length: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's part of ``length`` positions.

        Raises:
            ValueError: ``length`` is not a multiple of ``C`` (pad the rows: :meth:`ContextParallel.pad`).
        """
        if length % self.size:
            raise ValueError(
                f"context parallelism over {self.size} ranks needs rows whose length is a multiple of {self.size}, "
                f"got {length} positions (pad them: ContextParallel.pad)"
            )
        part = length // self.size
        return self.rank * part, (self.rank + 1) * part

    def attention(self, attend: Callable[..., Any]) -> Callable[..., Any]:
        """``attend`` over the whole sequence for ``N / C`` heads, between two all-to-alls."""
        size, group = self.size, self.group

        def ulysses(
            module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, None]:
            if query.shape[1] % size:
                raise ValueError(
                    f"context parallelism over {size} ranks splits attention heads, but the {query.shape[1]} query "
                    f"heads are not a multiple of {size}"
                )
            key, value = _divisible_heads(key, value, query.shape[1], size)
            q, k, v = (_heads_to_sequence_split(t, size, group) for t in (query, key, value))
            local = _Heads(module, q.shape[1] // k.shape[1])
            out, _ = attend(local, q, k, v, mask, **kwargs)  # [B, L, N/C, D]
            # attention probabilities would be those of our heads only: not returned under CP
            return _sequence_to_heads_split(out, size, group), None

        return ulysses


# ---------------------------------------------------------------------------------------------------- vision


def _owners(patches: Sequence[int], size: int) -> list[int]:
    """The CP rank encoding each image/video: largest first onto the least-loaded rank (same on every rank)."""
    load = [0] * size
    owner = [0] * len(patches)
    for i in sorted(range(len(patches)), key=lambda i: (-patches[i], i)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += patches[i]
    return owner


def shard_vision_tower(tower: nn.Module, group: Any) -> None:
    """Make ``tower`` data-parallel across ``group``: each rank encodes its share, all ranks get every output.

    Replaces ``forward`` on the instance. Every rank of the group must call the tower with the same
    pixels (a CP group shares its rows). A rank whose share is empty encodes a zero-weighted placeholder
    image (its tower blocks are FSDP units: every rank must run them). The output's ``last_hidden_state``
    is ``None`` (only the merged tokens and DeepStack features are exchanged).
    """
    from vl_vision import VisionOutput

    if getattr(tower, _ATTR, None) is not None:
        return
    encode = tower.forward
    size, me = dist.get_world_size(group), dist.get_rank(group)
    m: int = tower.config.spatial_merge_size  # type: ignore[union-attr,assignment]
    unit = m * m

    def forward(pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> Any:
        patches = grid_thw.long().prod(-1).tolist()
        owner = _owners(patches, size)
        starts = [0, *torch.tensor(patches).cumsum(0).tolist()]
        mine = [i for i in range(len(patches)) if owner[i] == me]
        anchor = None
        if mine:
            rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=pixel_values.device) for i in mine])
            out = encode(pixel_values[rows], grid_thw[mine])
        else:
            blank = pixel_values.new_zeros(unit, pixel_values.shape[1])
            out = encode(blank, torch.tensor([[1, m, m]], device=grid_thw.device))
            anchor = sum((f.sum() for f in [out.merged, *out.deepstack]), out.merged.new_zeros(())) * 0.0
        local = torch.cat([out.merged, *out.deepstack], dim=-1)
        merged_of = [p // unit for p in patches]
        counts = [sum(merged_of[i] for i in range(len(patches)) if owner[i] == r) for r in range(size)]
        if not mine:
            local = local[:0]
        padded = torch.cat([local, local.new_zeros(max(counts) - local.shape[0], local.shape[1])])
        gathered = _AllGather.apply(padded, group)
        pieces: list[torch.Tensor | None] = [None] * len(patches)
        for r in range(size):
            offset = 0
            for i in (i for i in range(len(patches)) if owner[i] == r):
                pieces[i] = gathered[r][offset : offset + merged_of[i]]
                offset += merged_of[i]
        full = torch.cat([p for p in pieces if p is not None])
        if anchor is not None:
            full = full + anchor.to(full.dtype)
        parts = full.split(out.merged.shape[-1], dim=-1)
        return VisionOutput(merged=parts[0], deepstack=list(parts[1:]), last_hidden_state=None)

    tower.forward = forward
    setattr(tower, _ATTR, group)


# ---------------------------------------------------------------------------------------------------- the run


class ContextParallel:
    """What a training step needs to know about context parallelism: padding, parts, loss layout.

    Args:
        group: The CP process group.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.sequence = UlyssesAttention(group)

    def pad(self, batch: dict[str, Any], targets: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        """Rows padded to a multiple of ``C`` positions (unscored padding; an ``attention_mask`` is added)."""
        length = targets.shape[1]
        extra = -length % self.size
        if not extra:
            return batch, targets
        out = dict(batch)
        if out.get("attention_mask") is None:
            out["attention_mask"] = torch.ones_like(targets)
        for key, value in PAD_VALUES.items():
            tensor = out.get(key)
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[1] == length:
                out[key] = torch.nn.functional.pad(tensor, (0, extra), value=value)
        positions = out.get("position_ids")
        if isinstance(positions, torch.Tensor):
            out["position_ids"] = torch.nn.functional.pad(positions, (0, extra), value=0)
        return out, torch.nn.functional.pad(targets, (0, extra), value=IGNORE_INDEX)

    def bounds(self, length: int) -> tuple[int, int]:
        """This rank's ``(start, stop)`` of ``length`` positions."""
        return self.sequence.bounds(length)

    def local(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's positions of a ``[B, L, ...]`` tensor (``None`` stays ``None``)."""
        if x is None:
            return None
        start, stop = self.bounds(x.shape[1])
        return x[:, start:stop]

    def layout(self, targets: torch.Tensor, segment_ids: torch.Tensor | None) -> SampleLayout:
        """Scored positions of this rank's part, weighted by their whole samples' token counts.

        Args:
            targets: ``[B, L]`` shifted labels of the whole rows.
            segment_ids: ``[B, L]`` packed sample ids of the whole rows, or ``None`` (a sample per row).
        """
        full = sample_layout(targets, segment_ids)
        length = targets.shape[1]
        start, stop = self.bounds(length)
        row, position = full.rows // length, full.rows % length
        keep = (position >= start) & (position < stop)
        rows = row[keep] * (stop - start) + position[keep] - start
        return SampleLayout(rows=rows, sample=full.sample[keep], counts=full.counts)


def apply_context_parallel(model: nn.Module, group: Any) -> ContextParallel:
    """Run ``model``'s decoder Ulysses-parallel and its tower data-parallel over ``group``.

    Args:
        model: A :class:`vl_model.TrainableVLM` with ``set_sequence_parallel`` (the core
            ``VLForConditionalGeneration``).
        group: The CP process group.

    Returns:
        The :class:`ContextParallel` a trainer uses (also :func:`context_parallel_of` ``(model)``).

    Raises:
        ValueError: The model cannot shard its decoder's sequence.
    """
    setter = getattr(model, "set_sequence_parallel", None)
    if not callable(setter):
        raise ValueError(
            f"{type(model).__name__} cannot run its decoder on a part of the sequence (no set_sequence_parallel): "
            "context parallelism supports vl_model.VLForConditionalGeneration"
        )
    context = ContextParallel(group)
    setter(context.sequence)
    shard_vision_tower(model.vision_tower(), group)  # type: ignore[operator]
    setattr(model, _ATTR, context)
    return context


def context_parallel_of(model: nn.Module) -> ContextParallel | None:
    """The :class:`ContextParallel` applied to ``model`` (``None``: none)."""
    found = getattr(model, _ATTR, None)
    return found if isinstance(found, ContextParallel) else None


def data_parallel_size(context_parallel: int = 1) -> int:
    """Data-parallel groups (distinct batches) among the world's ranks: ``W / C``."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return max(world // context_parallel, 1)


def data_parallel_rank(context_parallel: int = 1) -> int:
    """This rank's data-parallel group (ranks ``C d .. C d + C - 1`` form CP group ``d`` and share batches)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return rank // context_parallel


class DataParallelBatches(Iterator[dict[str, Any]]):
    """This rank's batches of a stream that every rank draws alike: group ``d`` of ``G`` takes batches ``d``, ``d + G``, ...

    The ``C`` ranks of a CP group (``G = W / C`` groups) get the same batches. Each rank draws every batch
    of a round of ``G`` and keeps its own: simple and resumable (the state is the stream's, the same on
    every rank, so a sharded checkpoint also resumes on another world size), at ``G`` times the data work
    of a sampler that shards before rendering.

    Args:
        batches: The stream (``state_dict`` / ``load_state_dict`` are passed through when it has them).
        context_parallel: ``C``.
    """

    def __init__(self, batches: Iterable[dict[str, Any]], context_parallel: int = 1) -> None:
        self.source = batches
        self._iter = batches if isinstance(batches, Iterator) else iter(batches)
        self.groups, self.group = data_parallel_size(context_parallel), data_parallel_rank(context_parallel)

    def __next__(self) -> dict[str, Any]:
        drawn = [next(self._iter) for _ in range(self.groups)]
        return drawn[self.group]

    @property
    def stats(self) -> Any:
        """The stream's data counts (``None`` without them), which the trainer logs."""
        return getattr(self.source, "stats", None)

    def state_dict(self) -> Any:
        """The stream's state (``None`` without one)."""
        get = getattr(self.source, "state_dict", None)
        return get() if callable(get) else None

    def load_state_dict(self, state: Any) -> None:
        """Restore the stream's state."""
        load = getattr(self.source, "load_state_dict", None)
        if callable(load):
            load(state)
            self._iter = self.source if isinstance(self.source, Iterator) else iter(self.source)
