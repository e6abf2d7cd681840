"""Back-of-the-envelope memory of a long-context training step per rank (the S3 / 256K preset's sizing).

The estimate (all sizes in bytes; ``W`` ranks, ``L`` tokens per rank's row, ``b`` activation bytes):

- parameters ``P`` = text + vision, with the text part
  ``V d (1 if tied else 2) + n [d (h + 2 k) e + h e d + 3 d f + 2 d + 2 e] + d``
  (embeddings / LM head, then per layer q, k, v, o projections, SwiGLU MLP, two RMSNorms, q/k norms;
  then the final norm); the vision tower and merger are given as a parameter count;
- model states under FSDP2 (ZeRO-3: every state sharded over ``W`` ranks):
  ``s P / W`` with ``s = 16`` (fp32 weights 4 + fp32 gradients 4 + AdamW moments 8);
- activations with checkpointing: the input of every layer is kept (``n L d b``) plus one layer's
  recompute working set in backward, ``2 L [2 d + (h + 2 k) e + h e + 3 f] b`` (norm output and
  residual, q/k/v, attention output, MLP gate / up / product; x 2 for their gradients; flash /
  memory-efficient attention, so no ``L^2`` term); without checkpointing every layer keeps its
  working set: ``n`` times that;
- the loss: ``lm_loss`` projects ``C`` labelled tokens at a time to fp32 logits and their gradient,
  ``2 C V 4``, where a plain loss materialises all ``N`` labelled tokens: ``2 N V 4``.

Not counted: the vision tower's activations (a few thousand patches per image, small next to 256K
text tokens), temporary buffers inside kernels, the allocator's fragmentation, communication buffers
(FSDP2 gathers one layer's parameters at a time: ``2 x 12 d^2``-ish, bf16). Packed rows cost no
``[L, L]`` mask (FlashAttention's varlen path, SDPA per sample); only eager attention builds one. Treat
the result as a lower bound for planning, not a promise.

Notation: ``V`` vocabulary, ``d`` hidden size, ``n`` layers, ``h`` query heads, ``k`` KV heads, ``e`` head
dim, ``f`` MLP width, ``L`` tokens, ``N`` labelled tokens, ``C`` loss chunk, ``W`` ranks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["QWEN3_VL_SIZES", "MemoryEstimate", "ModelSize", "estimate_memory", "memory_table"]

GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class ModelSize:
    """The shape of a decoder (Qwen3 text config field names in the docstrings) plus the vision tower's size.

    Attributes:
        hidden: ``hidden_size`` (``d``).
        layers: ``num_hidden_layers`` (``n``).
        heads: ``num_attention_heads`` (``h``).
        kv_heads: ``num_key_value_heads`` (``k``).
        head_dim: ``head_dim`` (``e``).
        intermediate: ``intermediate_size`` (``f``).
        vocab: ``vocab_size`` (``V``).
        tied: ``tie_word_embeddings``.
        vision_params: Parameters of the vision tower and mergers.
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int = 151936
    tied: bool = False
    vision_params: int = 0

    def __post_init__(self) -> None:
        bad = {k: v for k, v in vars(self).items() if isinstance(v, int) and not isinstance(v, bool) and v < 0}
        zero = [
            k
            for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab")
            if not getattr(self, k)
        ]
        if bad or zero:
            raise ValueError(f"ModelSize fields must be positive: negative {bad}, zero {zero}")

    def text_params(self) -> int:
        """Parameters of the language model (embeddings, layers, final norm, LM head unless tied)."""
        d, e, f = self.hidden, self.head_dim, self.intermediate
        per_layer = d * (self.heads + 2 * self.kv_heads) * e + self.heads * e * d + 3 * d * f + 2 * d + 2 * e
        return self.vocab * d * (1 if self.tied else 2) + self.layers * per_layer + d

    def params(self) -> int:
        """All parameters (text + vision)."""
        return self.text_params() + self.vision_params


# Text configs of the public Qwen3-VL checkpoints (their config.json); vision towers rounded
# (SigLIP-2 Large ~0.3B for the small models, SO-400M ~0.4B otherwise, plus mergers).
QWEN3_VL_SIZES: dict[str, ModelSize] = {
    "Qwen3-VL-2B": ModelSize(
        hidden=2048,
        layers=28,
        heads=16,
        kv_heads=8,
        head_dim=128,
        intermediate=6144,
        tied=True,
        vision_params=400_000_000,
    ),
    "Qwen3-VL-8B": ModelSize(
        hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=12288, vision_params=580_000_000
    ),
    "Qwen3-VL-32B": ModelSize(
        hidden=5120, layers=64, heads=64, kv_heads=8, head_dim=128, intermediate=25600, vision_params=590_000_000
    ),
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank of one training step (see the module docstring for each formula).

    Attributes:
        params: Parameter count ``P``.
        states: Sharded weights, gradients and AdamW moments (``s P / W``).
        checkpoints: Layer inputs kept by activation checkpointing (0 without it).
        working: Activations live in backward: one layer's with checkpointing, every layer's without.
        loss_chunked: ``lm_loss``'s logits and their gradient for one chunk.
        loss_full: The same for all labelled tokens at once (what an unchunked loss needs).
    """

    params: int
    states: int
    checkpoints: int
    working: int
    loss_chunked: int
    loss_full: int

    @property
    def total(self) -> int:
        """States + activations + the chunked loss: the estimate for vl_train's step."""
        return self.states + self.checkpoints + self.working + self.loss_chunked

    @property
    def total_unchunked(self) -> int:
        """The same with a loss that materialises all logits."""
        return self.states + self.checkpoints + self.working + self.loss_full


def estimate_memory(
    size: ModelSize,
    *,
    tokens: int = 262_144,
    labelled: int | None = None,
    world_size: int = 8,
    chunk_size: int = 4096,
    activation_checkpointing: bool = True,
    activation_bytes: int = 2,
    state_bytes: int = 16,
) -> MemoryEstimate:
    """Per-rank memory of one step on a ``tokens``-long row (formulas in the module docstring).

    Args:
        size: The model's shape.
        tokens: ``L``, tokens in the rank's row.
        labelled: ``N``, labelled tokens (default: all ``L``).
        world_size: ``W``, ranks sharing the model states (FSDP2).
        chunk_size: ``C``, labelled tokens per vocabulary projection of the loss.
        activation_checkpointing: Keep only each layer's input (True) or every activation (False).
        activation_bytes: ``b``, bytes per activation value (2 for bf16 autocast).
        state_bytes: ``s``, bytes of model state per parameter (16: fp32 weights + gradients + AdamW).

    Raises:
        ValueError: A non-positive count or ``labelled > tokens``.

    Example:
        >>> est = estimate_memory(QWEN3_VL_SIZES["Qwen3-VL-8B"], tokens=262_144, world_size=8)
        >>> round(est.loss_full / est.loss_chunked)  # 256K labelled tokens vs one 4096-token chunk
        64
    """
    labelled = tokens if labelled is None else labelled
    checks = {"tokens": tokens, "world_size": world_size, "chunk_size": chunk_size}
    checks |= {"activation_bytes": activation_bytes, "state_bytes": state_bytes}
    bad = {k: v for k, v in checks.items() if v < 1}
    if bad or not 0 <= labelled <= tokens:
        raise ValueError(
            f"estimate_memory needs positive {sorted(checks)} and 0 <= labelled <= tokens, got {bad or labelled}"
        )
    d, e, b = size.hidden, size.head_dim, activation_bytes
    params = size.params()
    layer = 2 * tokens * (2 * d + (size.heads + 2 * size.kv_heads) * e + size.heads * e + 3 * size.intermediate) * b
    checkpoints = size.layers * tokens * d * b if activation_checkpointing else 0
    working = layer if activation_checkpointing else size.layers * layer
    logits = 2 * size.vocab * 4  # fp32 logits and their gradient, per token
    return MemoryEstimate(
        params=params,
        states=-(-state_bytes * params // world_size),
        checkpoints=checkpoints,
        working=working,
        loss_chunked=min(chunk_size, labelled) * logits,
        loss_full=labelled * logits,
    )


def memory_table(sizes: Mapping[str, ModelSize] = QWEN3_VL_SIZES, **kwargs: object) -> str:
    """A Markdown table of :func:`estimate_memory` for each model (GiB per rank); ``kwargs`` go to it."""
    lines = [
        "| model | params | states / rank | checkpoints | layer working set | loss chunk | full logits | total (chunked) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, size in sizes.items():
        est = estimate_memory(size, **kwargs)  # type: ignore[arg-type]
        cells = [est.states, est.checkpoints, est.working, est.loss_chunked, est.loss_full, est.total]
        lines.append(f"| {name} | {est.params / 1e9:.2f}B | " + " | ".join(f"{c / GIB:.1f}" for c in cells) + " |")
    return "\n".join(lines)
