"""The decoder of the assembled VLM: Qwen3 attention, interleaved MRoPE, dense or MoE MLPs, DeepStack.

Follows the Qwen3-VL technical report (arXiv 2511.21631, sections 2.1-2.3): every layer is
pre-norm RMSNorm -> attention (per-head RMSNorm on q and k, grouped-query heads, rotary by
interleaved MRoPE from ``vl_rope``) -> residual -> RMSNorm -> SwiGLU MLP or ``vl_moe.SparseMoeBlock``
-> residual. DeepStack: after decoder layer ``i < len(deepstack)`` the ``i``-th DeepStack feature
set is *added* to the hidden states at the visual positions.

Attention runs through transformers' attention interface (``sdpa`` by default, FlashAttention when
installed, a local eager path for debugging) with the mask built by ``create_causal_mask``; a
``segment_ids`` tensor confines attention to each packed sample.

Notation: ``B`` batch, ``L`` new tokens, ``S`` cached + new tokens, ``H`` hidden size, ``D`` head dim,
``Nq``/``Nk`` query/key-value heads, ``V`` visual positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vl_moe import MoEExperts, SparseMoeBlock, TopKRouter
from vl_rope import MRoPE, apply_rotary
from vl_vision import VisionTransformer

from ._attention import eager_attention, flash_varlen_kwargs, packed_causal_mask, segment_mask_function
from .configuration import VLConfig, VLTextConfig

__all__ = ["RMSNorm", "VLPreTrainedModel", "VLTextModel", "VLTextModelOutput"]


# transformers' attention names -> the vision tower's backends
VISION_ATTN = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "flash", "flash_attention_3": "flash"}


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

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Any,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, L, H] -> [B, L, H]`` (and the attention probabilities on the eager path)."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rotary(q, k, *cos_sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attend: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation or "sdpa", eager_attention)
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


class VLTextDecoderLayer(nn.Module):
    """One pre-norm decoder layer; ``mlp`` is ``VLTextMLP`` or ``vl_moe.SparseMoeBlock`` per the config."""

    def __init__(self, config: VLTextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = VLTextAttention(config, layer_idx)
        self.mlp: nn.Module
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoeBlock(
                config.hidden_size,
                config.moe_intermediate_size,
                config.num_experts,
                config.num_experts_per_tok,
                backend=config.moe_backend,
                renormalize=config.norm_topk_prob,
                init_std=config.initializer_range,
            )
        else:
            self.mlp = VLTextMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Any,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new hidden states and, for an MoE layer, the router logits ``[B*L, E]``."""
        attn, _ = self.self_attn(
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
        return hidden_states + h, router_logits


class VLPreTrainedModel(PreTrainedModel):
    """Shared ``PreTrainedModel`` settings and weight init of the VLM classes."""

    config_class = VLConfig
    base_model_prefix = "model"
    input_modalities = ["image", "video", "text"]  # noqa: RUF012
    supports_gradient_checkpointing = True
    _no_split_modules = ["VLTextDecoderLayer", "VisionBlock"]  # noqa: RUF012
    _skip_keys_device_placement = ["past_key_values"]  # noqa: RUF012
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def set_attn_implementation(self, attn_implementation: Any, *args: Any, **kwargs: Any) -> Any:
        """Switch the decoder's attention (transformers names) and every vision tower's matching backend."""
        out = super().set_attn_implementation(attn_implementation, *args, **kwargs)
        name = attn_implementation if isinstance(attn_implementation, str) else self.config._attn_implementation
        for module in self.modules():
            if isinstance(module, VisionTransformer):
                module.set_attn_implementation(VISION_ATTN.get(str(name), "sdpa"))
        return out

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = float(getattr(self.config.get_text_config(), "initializer_range", 0.02) or 0.02)
        if isinstance(module, MRoPE):
            # non-persistent buffers are left uninitialised by meta-device loading: recompute them
            with torch.device("cpu"):
                fresh = MRoPE(module.head_dim, module.theta, module.mrope_section, module.interleaved, module.scaling)
            init.copy_(module.inv_freq, fresh.inv_freq)
            init.copy_(module.axis, fresh.axis)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        else:
            super()._init_weights(module)


@dataclass
class VLTextModelOutput(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus the MoE router logits (one ``[B*L, E]`` per MoE layer)."""

    router_logits: tuple[torch.Tensor, ...] | None = None


class VLTextModel(VLPreTrainedModel):
    """Embeddings, decoder layers and final norm (keys ``embed_tokens``, ``layers.{i}.*``, ``norm``)."""

    config_class = VLTextConfig  # type: ignore[assignment]
    input_modalities = ["text"]  # noqa: RUF012

    def __init__(self, config: VLTextConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([VLTextDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        rope: dict[str, Any] = dict(config.rope_parameters or {})
        # the frequency tables are built with ops that have no meta kernel (meta-device loading)
        device = torch.device("cpu") if torch.empty(0).device.type == "meta" else None
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.rotary_emb = MRoPE(
                head_dim_of(config),
                float(rope["rope_theta"]),
                rope["mrope_section"],
                interleaved=bool(rope.get("mrope_interleaved", True)),
                scaling=config.rope_scaling_spec(),
            )
        self.gradient_checkpointing = False
        self.post_init()

    def _check_context(self, position_ids: torch.Tensor) -> None:
        if torch.compiler.is_compiling() or position_ids.numel() == 0:
            return
        limit = int(self.config.max_position_embeddings)
        highest = int(position_ids.max())
        if highest >= limit and self.config.rope_parameters.get("rope_type", "default") == "default":
            raise ValueError(
                f"position {highest} is beyond the configured context of {limit} positions "
                f"(max_position_embeddings) and rope_parameters has no scaling; set a rope_type such as 'yarn' "
                f"with a factor, or raise max_position_embeddings"
            )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        visual_pos_masks: torch.Tensor | None = None,
        deepstack_visual_embeds: list[torch.Tensor] | None = None,
        segment_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Any,
    ) -> VLTextModelOutput:
        """Run the decoder.

        Args:
            input_ids: ``[B, L]`` (or give ``inputs_embeds [B, L, H]``).
            attention_mask: ``[B, S]``, 0 at padding (or a prepared 4-D mask).
            position_ids: ``[3, B, L]`` MRoPE positions, ``[4, B, L]`` (a text row first, ignored) or ``[B, L]``;
                default: consecutive positions after the cache.
            past_key_values: A transformers ``Cache``; created when ``use_cache`` and absent.
            inputs_embeds: ``[B, L, H]``.
            use_cache: Return the cache.
            visual_pos_masks: ``[B, L]`` True at the ``V`` visual positions (DeepStack targets).
            deepstack_visual_embeds: One ``[V, H]`` tensor per DeepStack layer, added after layers 0, 1, ...
            segment_ids: ``[B, L]`` packed-sample ids: attention stays within each sample.
            output_hidden_states: Also return each layer's input and the final output.
            output_router_logits: Also return the MoE router logits.
            **kwargs: Passed to the attention function (e.g. FlashAttention varlen arguments).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            # a recomputed layer would append its keys to the cache a second time
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        batch, length = inputs_embeds.shape[:2]
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device).expand(3, batch, -1)
        elif position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        elif position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        self._check_context(position_ids)

        implementation = str(self.config._attn_implementation or "sdpa")
        fresh = past_key_values is None or past_key_values.get_seq_length() == 0
        plain_padding = attention_mask is None or attention_mask.dim() == 2
        mask: Any = None
        if segment_ids is not None and "flash" in implementation:
            # FlashAttention takes no mask function: run the packed samples as varlen sequences instead
            kwargs = {**flash_varlen_kwargs(segment_ids), **kwargs}
        elif segment_ids is not None and fresh and plain_padding and implementation in ("sdpa", "eager"):
            mask = packed_causal_mask(segment_ids, attention_mask)
        else:
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                position_ids=None,
                and_mask_function=None if segment_ids is None else segment_mask_function(segment_ids),
            )
        cos_sin = self.rotary_emb(position_ids, dtype=inputs_embeds.dtype)
        hidden = inputs_embeds
        all_hidden: list[torch.Tensor] = []
        routers: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden)
            if self.gradient_checkpointing and self.training:
                hidden, router = self._gradient_checkpointing_func(
                    layer.__call__, hidden, cos_sin, mask, past_key_values, **kwargs
                )
            else:
                hidden, router = layer(hidden, cos_sin, mask, past_key_values, **kwargs)
            if router is not None:
                routers.append(router)
            if (
                deepstack_visual_embeds is not None
                and visual_pos_masks is not None
                and i < len(deepstack_visual_embeds)
            ):
                hidden = add_at_positions(hidden, visual_pos_masks, deepstack_visual_embeds[i])
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        return VLTextModelOutput(
            last_hidden_state=hidden,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            router_logits=tuple(routers) if output_router_logits and routers else None,
        )


def add_at_positions(hidden: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``hidden [B, L, H]`` with ``features [V, H]`` added at the ``V`` True entries of ``mask [B, L]``."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    index = mask.reshape(-1).nonzero().squeeze(-1)
    return flat.index_add(0, index, features.to(flat.dtype)).view_as(hidden)
