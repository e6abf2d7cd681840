"""The parts of a decoder layer and the builder that assembles one layer from them.

Follows the Qwen3-VL technical report (arXiv 2511.21631, sections 2.1-2.3): a layer is pre-norm
RMSNorm -> attention (per-head RMSNorm on q and k, grouped-query heads, rotary by interleaved MRoPE)
-> residual -> RMSNorm -> SwiGLU MLP or ``vl_moe.SparseMoeBlock`` -> residual. As in vl-vision's
``build_block``, :class:`VLTextDecoderLayer` takes its attention, MLP (or MoE block) and norms as
arguments and :func:`build_decoder_layer` picks them from the config, so a variant is a new builder,
not a subclass. Keys equal transformers' ``Qwen3VLTextDecoderLayer`` (``self_attn.*``, ``mlp.*``,
``input_layernorm``, ``post_attention_layernorm``).

Notation: ``B`` batch, ``L`` new tokens, ``S`` cached + new tokens, ``H`` hidden size, ``D`` head dim,
``Nq``/``Nk`` query/key-value heads, ``E`` experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vl_moe import SparseMoeBlock
from vl_rope import apply_rotary

from ._attention import eager_attention, packed_sdpa_attention
from .configuration import VLTextConfig

__all__ = [
    "RMSNorm",
    "VLTextAttention",
    "VLTextDecoderLayer",
    "VLTextMLP",
    "build_decoder_layer",
    "head_dim_of",
    "rotary_sections",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled by a learned weight (Qwen3 convention)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def head_dim_of(config: VLTextConfig) -> int:
    """``head_dim``, or ``hidden_size / num_attention_heads`` when the config leaves it unset."""
    return int(config.head_dim or config.hidden_size // config.num_attention_heads)


def rotary_sections(mrope_section: Sequence[int], frequencies: int, interleaved: bool) -> list[int]:
    """The T/H/W frequency counts that ``mrope_section`` really lays out over ``frequencies`` frequencies.

    The interleaved layout gives frequency ``i`` to H when ``i % 3 == 1`` and ``i < 3h``, to W when
    ``i % 3 == 2`` and ``i < 3w``, to T otherwise, for ``i < frequencies``. transformers applies that
    rule to any section, so a section that does not sum to ``frequencies`` (e.g. ``[16, 8, 8]`` on a
    head dim of 8 in its tests) still means one layout; these counts give ``vl_rope.MRoPE`` the same
    layout. The chunked layout has no such reading: its sections are returned as given.
    """
    sections = [int(s) for s in mrope_section]
    if not interleaved or len(sections) != 3:
        return sections
    h = len(range(1, min(frequencies, 3 * sections[1]), 3))
    w = len(range(2, min(frequencies, 3 * sections[2]), 3))
    return [frequencies - h - w, h, w]


class VLTextAttention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorm and MRoPE (keys ``q_proj``..``k_norm``)."""

    def __init__(self, config: VLTextConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d, kv_heads = head_dim_of(config), int(config.num_key_value_heads or config.num_attention_heads)
        self.head_dim = d
        self.num_key_value_groups = config.num_attention_heads // kv_heads
        self.scaling = d**-0.5
        self.attention_dropout = float(config.attention_dropout)
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * d, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * d, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(d, eps=config.rms_norm_eps)
        # context parallelism (vl_model.runtime.SequenceParallel): attention over the whole sharded sequence
        self.sequence_parallel: Any = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Any,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, L, H] -> [B, L, H]`` and the attention probabilities ``[B, Nq, L, S]`` (eager only, else None)."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rotary(q, k, *cos_sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attend: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation or "sdpa", eager_attention)
        if "segment_spans" in kwargs:  # packed rows under SDPA: the text model gave spans instead of a mask
            attend = packed_sdpa_attention
        if self.sequence_parallel is not None:
            if past_key_values is not None:
                raise ValueError("context parallelism runs without a KV cache: pass use_cache=False")
            attend = self.sequence_parallel.attention(attend)
        out, probs = attend(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), probs


class VLTextMLP(nn.Module):
    """Dense SwiGLU MLP: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: VLTextConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class VLTextDecoderLayer(GradientCheckpointingLayer):
    """One pre-norm decoder layer assembled from its parts.

    A ``GradientCheckpointingLayer``: ``model.gradient_checkpointing_enable()`` recomputes it in backward,
    and a cache passed as ``past_key_values=`` is dropped while it does (as in transformers' layers).

    Args:
        self_attn: The attention (``[B, L, H] -> ([B, L, H], probabilities or None)``).
        mlp: The dense MLP, or a ``vl_moe.SparseMoeBlock`` (then the router logits are returned too).
        input_layernorm: Norm before the attention.
        post_attention_layernorm: Norm before the MLP.
    """

    def __init__(
        self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module, post_attention_layernorm: nn.Module
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Any,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(hidden [B, L, H], router logits [B*L, E] of an MoE layer or None, attention probabilities or None)``."""
        attn, probs = self.self_attn(
            self.input_layernorm(hidden_states), cos_sin, attention_mask, past_key_values, **kwargs
        )
        hidden_states = hidden_states + attn
        h = self.post_attention_layernorm(hidden_states)
        router_logits = None
        if isinstance(self.mlp, SparseMoeBlock):
            moe = self.mlp.forward_with_router(h)
            h, router_logits = moe.hidden_states, moe.router_logits
        else:
            h = self.mlp(h)
        return hidden_states + h, router_logits, probs


def build_decoder_layer(config: VLTextConfig, layer_idx: int) -> VLTextDecoderLayer:
    """Decoder layer ``layer_idx`` with the parts ``config`` selects (dense SwiGLU or sparse MoE block)."""
    mlp: nn.Module
    if config.is_moe_layer(layer_idx):
        mlp = SparseMoeBlock(
            config.hidden_size,
            config.moe_intermediate_size,
            config.num_experts,
            config.num_experts_per_tok,
            backend=config.moe_backend,
            renormalize=config.norm_topk_prob,
            init_std=config.initializer_range,
        )
    else:
        mlp = VLTextMLP(config)
    return VLTextDecoderLayer(
        VLTextAttention(config, layer_idx),
        mlp,
        RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
        RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
    )
