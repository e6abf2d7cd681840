"""Memory planner: bytes per GPU of a training step for a model config x sequence length x parallelism.

``vl-train plan`` (and :func:`plan_memory`) builds the model on the meta device (no memory, no
weights) to count its parameters by part, then adds the step's activations from the config's shapes.
Presets hold the public ``config.json`` values of Qwen3-VL 2B, 8B, 32B, 30B-A3B and 235B-A22B.

Per rank, with ``W`` ranks, ``C`` the CP size, ``T = B L / C`` tokens this rank decodes, ``b`` bytes per
activation (2 under bf16 autocast) and ``p`` bytes per gathered parameter (2 with bf16 FSDP parameters):

- ``states``: ``s P / W`` with ``s = 16`` (fp32 weights, gradients, two AdamW moments); FSDP2 shards every
  parameter over all ``W`` ranks, expert parallelism shards the experts over them (each rank keeps ``E / W``);
- ``gathered``: what FSDP2 unshards on top: the root (embeddings, output head, final norm, patch and
  position embeddings) for the whole forward and backward, and two decoder layers (the one computing and
  the next, prefetched); under expert parallelism a layer's experts are never gathered;
- ``checkpoints``: with activation checkpointing, every decoder layer's input ``n T d b``;
- ``working``: the activations of one layer in backward (with checkpointing) or of all ``n`` (without):
  ``2 T [2 d + (h + 2k) e + h e] b`` for norms, q/k/v and the attention output (x 2: their gradients), the
  Ulysses all-to-all copies of q/k/v/output ``T (2h + 2k) e b`` when ``C > 1``, and the MLP: dense
  ``2 T 3 f b``; MoE ``2 T k (d + 3 I) b`` (each of the ``k`` slots' input row and SwiGLU activations) plus the
  router's fp32 logits ``T E 4``;
- ``loss``: ``lm_loss``'s fp32 logits and their gradient for one chunk, ``2 min(c, N) V 4``, and the final
  hidden states ``T d b``;

Packed rows cost no ``[L, L]`` mask: FlashAttention runs them as varlen sequences and SDPA per sample
(vl-model's ``packed_sdpa_attention``); only the eager reference path builds one (``B L^2`` bytes).

Not counted: the vision tower's activations (thousands of patches, small next to 32K+ tokens), kernel
workspaces, communication buffers beyond the unsharded parameters, allocator fragmentation (budget
10-20% on GPUs). The planner is checked against measured peaks of small CPU steps (tests/vl_train/test_plan.py).

Notation: ``P`` parameters, ``n`` layers, ``d`` hidden size, ``h``/``k`` query/key-value heads, ``e`` head dim,
``f`` MLP width, ``E`` experts, ``k`` experts per token (MoE), ``I`` expert width, ``V`` vocabulary, ``c`` loss chunk.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["PRESETS", "MemoryPlan", "ModelParts", "main", "model_parts", "plan_memory", "plan_table"]

GIB = 2**30

_VISION_SMALL = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "deepstack_visual_indexes": [5, 11, 17]}
_VISION_LARGE = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "deepstack_visual_indexes": [8, 16, 24]}
_VISION_COMMON = {"num_heads": 16, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}
_ROPE = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}


def _preset(text: dict[str, Any], vision: dict[str, Any], *, tie: bool = False) -> dict[str, Any]:
    moe = "num_experts" in text
    text = {
        "vocab_size": 151936,
        "head_dim": 128,
        "max_position_embeddings": 262144,
        "rope_parameters": dict(_ROPE),
        **text,
    }
    vision = {**_VISION_COMMON, **vision, "out_hidden_size": text["hidden_size"], "num_position_embeddings": 2304}
    return {
        "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": tie,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "Qwen3-VL-2B": _preset(
        {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
         "num_key_value_heads": 8},
        _VISION_SMALL,
        tie=True,
    ),
    "Qwen3-VL-8B": _preset(
        {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
         "num_key_value_heads": 8},
        _VISION_LARGE,
    ),
    "Qwen3-VL-32B": _preset(
        {"hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64, "num_attention_heads": 64,
         "num_key_value_heads": 8},
        _VISION_LARGE,
    ),
    "Qwen3-VL-30B-A3B": _preset(
        {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
         "num_key_value_heads": 4, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
         "decoder_sparse_step": 1},
        _VISION_LARGE,
    ),
    "Qwen3-VL-235B-A22B": _preset(
        {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 94, "num_attention_heads": 64,
         "num_key_value_heads": 4, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1536,
         "decoder_sparse_step": 1},
        _VISION_LARGE,
    ),
}  # fmt: skip
"""Official ``config.json`` content (``qwen3_vl`` / ``qwen3_vl_moe``) of the public Qwen3-VL checkpoints."""


@dataclass(frozen=True)
class ModelParts:
    """Parameter counts of a model by what parallelism does with them (from the meta-device model).

    Attributes:
        total: All parameters.
        experts: Parameters of the MoE experts (sharded by expert parallelism).
        root: Parameters outside every FSDP unit (embeddings, output head, final norm, patch / position
            embeddings): kept gathered by FSDP2 through forward and backward.
        largest_layer: The largest decoder layer, experts included.
        largest_layer_experts: The experts in that layer.
        vision: The vision tower with its mergers.
    """

    total: int
    experts: int
    root: int
    largest_layer: int
    largest_layer_experts: int
    vision: int


def _config(config: Mapping[str, Any] | Any) -> Any:
    from vl_model import VLConfig

    if isinstance(config, VLConfig):
        return config
    data = copy.deepcopy(dict(config.to_dict() if hasattr(config, "to_dict") else config))
    return VLConfig.from_qwen3_vl(data) if data.get("model_type") in ("qwen3_vl", "qwen3_vl_moe") else VLConfig(**data)


def _count(module: nn.Module | None, seen: set[int]) -> int:
    if module is None:
        return 0
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def model_parts(config: Mapping[str, Any] | Any) -> ModelParts:
    """Count the parameters of ``config``'s model, built on the meta device (no memory is allocated).

    Args:
        config: A ``VLConfig``, an official ``qwen3_vl`` / ``qwen3_vl_moe`` config (dict or object), or a
            :data:`PRESETS` entry.
    """
    from vl_model import VLForConditionalGeneration
    from vl_moe import MoEExperts

    with torch.device("meta"):
        model = VLForConditionalGeneration(_config(config))
    from .parallel import shard_units

    units = [unit for _, unit in shard_units(model)]
    in_units: set[int] = set()
    for unit in units:
        _count(unit, in_units)
    total = _count(model, set())
    root = total - sum(p.numel() for unit in units for p in unit.parameters())
    layers = list(model.decoder_layers())
    sizes = [(_count(layer, set()), sum(_count(m, set()) for m in layer.modules() if isinstance(m, MoEExperts)))
             for layer in layers]  # fmt: skip
    largest, largest_experts = max(sizes)
    experts = sum(e for _, e in sizes)
    return ModelParts(total, experts, root, largest, largest_experts, _count(model.vision_tower(), set()))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of one training step (see the module docstring for each term).

    Attributes:
        parts: The parameter counts.
        states: Sharded fp32 weights, gradients and AdamW moments.
        gathered: Parameters FSDP2 holds unsharded at once (root + two layers).
        checkpoints: Decoder layer inputs kept by activation checkpointing.
        working: Activations live in backward (one layer with checkpointing, all without).
        loss: One loss chunk's logits and gradient, and the final hidden states.
        tokens_per_rank: ``T``, the tokens this rank's decoder layers process.
    """

    parts: ModelParts
    states: int
    gathered: int
    checkpoints: int
    working: int
    loss: int
    tokens_per_rank: int

    @property
    def total(self) -> int:
        """The estimate of the step's peak on one rank."""
        return self.states + self.gathered + self.checkpoints + self.working + self.loss

    @property
    def activations(self) -> int:
        """The step's activations (what grows with the tokens): checkpoints, working set, loss."""
        return self.checkpoints + self.working + self.loss


def plan_memory(
    config: Mapping[str, Any] | Any,
    *,
    tokens: int,
    rows: int = 1,
    world_size: int = 1,
    context_parallel: int = 1,
    expert_parallel: int = 1,
    activation_checkpointing: bool = True,
    activation_bytes: int = 2,
    param_bytes: int = 2,
    state_bytes: int = 16,
    chunk_size: int = 4096,
    labelled: int | None = None,
) -> MemoryPlan:
    """Per-rank memory of one training step (formulas in the module docstring).

    Args:
        config: The model (see :func:`model_parts`).
        tokens: ``L``, positions per row (a packed row's length).
        rows: ``B``, rows per micro-batch.
        world_size: ``W``, ranks FSDP2 shards over.
        context_parallel: ``C``, ranks each row's sequence is split over (divides ``W``).
        expert_parallel: ``1`` or ``W``: experts sharded over every rank and never gathered.
        activation_checkpointing: Keep only each layer's input.
        activation_bytes: ``b`` (2 under bf16 autocast, 4 in fp32).
        param_bytes: ``p``, bytes of a gathered parameter (2 with bf16 FSDP2 parameters, 4 in fp32).
        state_bytes: ``s``, bytes of model state per parameter.
        chunk_size: ``c``, labelled tokens per vocabulary projection of the loss.
        labelled: ``N``, labelled tokens per row (default: all).

    Raises:
        ValueError: Sizes that do not fit (``C`` not dividing ``W``, ``expert_parallel`` neither 1 nor ``W``, ...).
    """
    if min(tokens, rows, world_size, context_parallel, expert_parallel, chunk_size) < 1:
        raise ValueError("tokens, rows, world_size, context_parallel, expert_parallel and chunk_size must be >= 1")
    if world_size % context_parallel:
        raise ValueError(f"context_parallel = {context_parallel} must divide world_size = {world_size}")
    if expert_parallel not in (1, world_size):
        raise ValueError(f"expert_parallel must be 1 or world_size = {world_size}, got {expert_parallel}")
    cfg = _config(config)
    text = cfg.text_config
    parts = model_parts(cfg)
    d, n, b = int(text.hidden_size), int(text.num_hidden_layers), activation_bytes
    heads, kv = int(text.num_attention_heads), int(text.num_key_value_heads or text.num_attention_heads)
    e = int(text.head_dim or d // heads)
    padded = -(-tokens // context_parallel) * context_parallel
    t = rows * padded // context_parallel

    states = -(-state_bytes * parts.total // world_size)
    gathered = 0
    if world_size > 1:
        layer = parts.largest_layer - (parts.largest_layer_experts if expert_parallel > 1 else 0)
        # the local shard is already counted in the states
        gathered = (parts.root + 2 * layer) * param_bytes * (world_size - 1) // world_size

    attention_acts = 2 * t * (2 * d + (heads + 2 * kv) * e + heads * e) * b
    if context_parallel > 1:
        attention_acts += t * (2 * heads + 2 * kv) * e * b
    experts = int(getattr(text, "num_experts", 0) or 0)
    if experts:
        k, width = int(text.num_experts_per_tok), int(text.moe_intermediate_size)
        mlp = 2 * t * k * (d + 3 * width) * b + t * experts * 4
    else:
        mlp = 2 * t * 3 * int(text.intermediate_size) * b
    one_layer = attention_acts + mlp
    checkpoints = n * t * d * b if activation_checkpointing else 0
    working = one_layer if activation_checkpointing else n * one_layer
    scored = padded if labelled is None else min(labelled, padded)
    per_rank_scored = rows * -(-scored // context_parallel)
    loss = 2 * min(chunk_size, per_rank_scored) * int(text.vocab_size) * 4 + t * d * b
    return MemoryPlan(parts, states, gathered, checkpoints, working, loss, t)


def plan_table(presets: Mapping[str, Mapping[str, Any]] | Sequence[str] = tuple(PRESETS), **kwargs: Any) -> str:
    """A Markdown table of :func:`plan_memory` (GiB per rank) for each preset; ``kwargs`` go to it."""
    chosen = {name: PRESETS[name] for name in presets} if not isinstance(presets, Mapping) else dict(presets)
    lines = [
        "| model | params | states | gathered | checkpoints | working | loss | total / rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, config in chosen.items():
        plan = plan_memory(config, **kwargs)
        cells = [plan.states, plan.gathered, plan.checkpoints, plan.working, plan.loss, plan.total]
        lines.append(
            f"| {name} | {plan.parts.total / 1e9:.1f}B | " + " | ".join(f"{c / GIB:.1f}" for c in cells) + " |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vl-train plan", description="Estimate the memory per GPU of a training step (vl_train.plan)."
    )
    parser.add_argument("--model", default="all", help=f"a preset ({', '.join(PRESETS)}), 'all', or a config.json")
    parser.add_argument("--tokens", type=int, default=32768, help="positions per (packed) row")
    parser.add_argument("--rows", type=int, default=1, help="rows per micro-batch")
    parser.add_argument("--world", type=int, default=8, help="ranks (GPUs) FSDP2 shards over")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (1 or --world)")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every activation")
    parser.add_argument("--fp32", action="store_true", help="fp32 activations and gathered parameters")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``vl-train plan``: print the table of :func:`plan_memory` for a preset, all presets or a config.json."""
    import json
    from pathlib import Path

    args = _parser().parse_args(argv)
    if args.model == "all":
        models: dict[str, Any] = dict(PRESETS)
    elif args.model in PRESETS:
        models = {args.model: PRESETS[args.model]}
    elif Path(args.model).is_file():
        models = {Path(args.model).parent.name or args.model: json.loads(Path(args.model).read_text())}
    else:
        print(f"vl-train plan: error: {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        return 2
    wide = 4 if args.fp32 else 2
    try:
        table = plan_table(
            models,
            tokens=args.tokens,
            rows=args.rows,
            world_size=args.world,
            context_parallel=args.cp,
            expert_parallel=args.ep,
            activation_checkpointing=not args.no_checkpointing,
            activation_bytes=wide,
            param_bytes=wide,
        )
    except ValueError as exc:
        print(f"vl-train plan: error: {exc}")
        return 2
    ckpt = "off" if args.no_checkpointing else "on"
    print(
        f"GiB per GPU: {args.tokens} tokens x {args.rows} row(s), {args.world} GPUs, CP {args.cp}, EP {args.ep}, "
        f"activation checkpointing {ckpt}"
    )
    print(table)
    return 0
