"""The decoder of the assembled VLM: Qwen3 attention, interleaved MRoPE, dense or MoE MLPs, DeepStack.

Follows the Qwen3-VL technical report (arXiv 2511.21631, sections 2.1-2.3): every layer is
pre-norm RMSNorm -> attention (per-head RMSNorm on q and k, grouped-query heads, rotary by
interleaved MRoPE from ``vl_rope``) -> residual -> RMSNorm -> SwiGLU MLP or ``vl_moe.SparseMoeBlock``
-> residual. DeepStack: after decoder layer ``i < len(deepstack)`` the ``i``-th DeepStack feature
set is *added* to the hidden states at the visual positions.

The layers are built from their parts by ``_decoder.build_decoder_layer``. Attention runs through
transformers' attention interface (``sdpa`` by default, FlashAttention when installed, a local eager
path that also returns the attention probabilities) with the mask built by ``create_causal_mask``;
``segment_ids``, or positions that restart at every packed sample, confine attention to each sample.
What user code sees follows transformers' ``Qwen3VLTextModel``: ``hidden_states`` are the embeddings,
each layer's output before its DeepStack addition, and the final normed output; ``output_*`` and
``return_dict`` default to the config's values.

Notation: ``B`` batch, ``L`` new tokens, ``S`` cached + new tokens, ``H`` hidden size, ``D`` head dim,
``Nq``/``Nk`` query/key-value heads, ``V`` visual positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import logging

from vl_moe import MoEExperts, TopKRouter
from vl_rope import MRoPE
from vl_vision import VisionTransformer

from ._attention import (
    flash_varlen_kwargs,
    packed_causal_mask,
    segment_mask_function,
    segment_spans,
    segments_from_positions,
)
from ._decoder import RMSNorm, build_decoder_layer, head_dim_of, rotary_sections
from ._inputs import check_token_ids
from ._vision import VISION_ATTN, VLVisionTower
from .configuration import VLConfig, VLTextConfig

__all__ = ["RMSNorm", "VLPreTrainedModel", "VLTextModel", "VLTextModelOutput", "add_at_positions"]

logger = logging.get_logger(__name__)


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
        """Switch the decoder's attention (transformers names) and every vision tower's matching backend.

        A dict (``{"text_config": ..., "vision_config": ...}``) sets each part as in transformers.
        """
        out = super().set_attn_implementation(attn_implementation, *args, **kwargs)
        vision_config = getattr(self.config, "vision_config", None)
        name = getattr(vision_config, "_attn_implementation", None) or (
            attn_implementation if isinstance(attn_implementation, str) else self.config._attn_implementation
        )
        for module in self.modules():
            if isinstance(module, VLVisionTower):
                module.set_attn_implementation(str(name))
            elif isinstance(module, VisionTransformer):
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
    """``BaseModelOutputWithPast`` plus the MoE router logits (one ``[B*L, E]`` per MoE layer).

    Field order equals transformers' ``MoeModelOutputWithPast``, so ``to_tuple()`` matches it.
    """

    router_logits: tuple[torch.Tensor, ...] | None = None


def _flag(given: bool | None, config: Any, name: str) -> bool:
    """An ``output_*`` / ``return_dict`` switch: the argument when given, else the config's value."""
    return bool(getattr(config, name, False)) if given is None else bool(given)


class VLTextModel(VLPreTrainedModel):
    """Embeddings, decoder layers and final norm (keys ``embed_tokens``, ``layers.{i}.*``, ``norm``)."""

    config_class = VLTextConfig  # type: ignore[assignment]
    input_modalities = ["text"]  # noqa: RUF012

    def __init__(self, config: VLTextConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([build_decoder_layer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        rope: dict[str, Any] = dict(config.rope_parameters or {})
        head_dim = head_dim_of(config)
        interleaved = bool(rope.get("mrope_interleaved", True))
        # the frequency tables are built with ops that have no meta kernel (meta-device loading)
        device = torch.device("cpu") if torch.empty(0).device.type == "meta" else None
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.rotary_emb = MRoPE(
                head_dim,
                float(rope["rope_theta"]),
                rotary_sections(rope["mrope_section"], head_dim // 2, interleaved),
                interleaved=interleaved,
                scaling=config.rope_scaling_spec(),
            )
        self.gradient_checkpointing = False
        # context parallelism (vl_model.runtime.SequenceParallel): the layers run on this rank's part of the row
        self.sequence_parallel: Any = None
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

    def _mask(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        segment_ids: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> tuple[Any, dict[str, Any]]:
        """The attention mask for the implementation in use, or the kwargs that replace it (varlen, spans)."""
        implementation = str(self.config._attn_implementation or "sdpa")
        fresh = past_key_values is None or past_key_values.get_seq_length() == 0
        plain_padding = attention_mask is None or attention_mask.dim() == 2
        if segment_ids is not None and "flash" in implementation:
            # FlashAttention takes no mask function: run the packed samples as varlen sequences instead
            return None, {**flash_varlen_kwargs(segment_ids), **kwargs}
        if (
            segment_ids is not None
            and implementation == "sdpa"
            and fresh  # a prefill's keys are the row itself; later steps take the mask function below
            and plain_padding
            and not torch.compiler.is_compiling()  # the spans are Python ints: a compiled graph keeps the mask
        ):
            # per-sample spans instead of a dense [L, L] mask (see _attention.packed_sdpa_attention)
            return None, {"segment_spans": segment_spans(segment_ids, attention_mask), **kwargs}
        if segment_ids is not None and fresh and plain_padding and implementation in ("sdpa", "eager"):
            return packed_causal_mask(segment_ids, attention_mask), kwargs
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=None,
            and_mask_function=None if segment_ids is None else segment_mask_function(segment_ids),
        )
        return mask, kwargs

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
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> VLTextModelOutput | tuple[Any, ...]:
        """Run the decoder.

        Args:
            input_ids: ``[B, L]`` (or give ``inputs_embeds [B, L, H]``).
            attention_mask: ``[B, S]``, 0 at padding (or a prepared 4-D mask).
            position_ids: ``[3, B, L]`` MRoPE positions, ``[4, B, L]`` (a text row first) or ``[B, L]``;
                default: consecutive positions after the cache. Without ``attention_mask`` and cache, text
                positions (``[B, L]`` or the first row of ``[4, B, L]``) that restart mark packed samples,
                which then attend only within themselves, as in transformers.
            past_key_values: A transformers ``Cache``; created when ``use_cache`` and absent.
            inputs_embeds: ``[B, L, H]``.
            use_cache: Return the cache.
            visual_pos_masks: ``[B, L]`` True at the ``V`` visual positions (DeepStack targets).
            deepstack_visual_embeds: One ``[V, H]`` tensor per DeepStack layer, added after layers 0, 1, ...
            segment_ids: ``[B, L]`` packed-sample ids: attention stays within each sample.
            output_hidden_states: Also return the embeddings, each layer's output (before its DeepStack
                addition) and the final normed output (``num_hidden_layers + 1`` tensors; the last layer's
                output is replaced by the normed one). Default: the config's value.
            output_router_logits: Also return the MoE router logits.
            output_attentions: Also return each layer's attention probabilities ``[B, Nq, L, S]``; only the
                eager implementation has them (another one warns and returns an empty tuple, as transformers).
                Default: the config's value.
            return_dict: False returns ``to_tuple()`` of the output. Default: the config's value.
            **kwargs: Passed to the attention function (e.g. FlashAttention varlen arguments).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        want_hidden = _flag(output_hidden_states, self.config, "output_hidden_states")
        want_attentions = _flag(output_attentions, self.config, "output_attentions")
        if inputs_embeds is None:
            assert input_ids is not None
            check_token_ids(input_ids, self.embed_tokens.num_embeddings, training=self.training)
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            # a recomputed layer would append its keys to the cache a second time
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        batch, length = inputs_embeds.shape[:2]
        text_positions = None
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device).expand(3, batch, -1)
        elif position_ids.dim() == 2:
            text_positions = position_ids
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        elif position_ids.shape[0] == 4:
            text_positions, position_ids = position_ids[0], position_ids[1:]
        self._check_context(position_ids)
        fresh = past_key_values is None or past_key_values.get_seq_length() == 0
        if segment_ids is None and attention_mask is None and text_positions is not None and fresh:
            segment_ids = segments_from_positions(text_positions, batch)
        mask, kwargs = self._mask(inputs_embeds, attention_mask, past_key_values, segment_ids, kwargs)
        if want_attentions and str(self.config._attn_implementation or "sdpa") != "eager":
            logger.warning_once(
                f"`{self.config._attn_implementation}` attention does not return attention probabilities: "
                "set attn_implementation='eager' for output_attentions=True"
            )

        cos_sin = self.rotary_emb(position_ids, dtype=inputs_embeds.dtype)
        hidden = inputs_embeds
        if self.sequence_parallel is not None:
            # positions (with their per-sample resets) and the mask came from the whole row; keep our part
            hidden, cos_sin, visual_pos_masks, deepstack_visual_embeds = local_part(
                self.sequence_parallel.bounds(length), hidden, cos_sin, visual_pos_masks, deepstack_visual_embeds
            )
        all_hidden: list[torch.Tensor] = [hidden] if want_hidden else []
        routers: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden, router, probs = layer(hidden, cos_sin, mask, past_key_values=past_key_values, **kwargs)
            if router is not None:
                routers.append(router)
            if want_attentions and probs is not None:
                attentions.append(probs)
            if want_hidden and i < last:
                all_hidden.append(hidden)
            if (
                deepstack_visual_embeds is not None
                and visual_pos_masks is not None
                and i < len(deepstack_visual_embeds)
            ):
                hidden = add_at_positions(hidden, visual_pos_masks, deepstack_visual_embeds[i])
        hidden = self.norm(hidden)
        if want_hidden:
            all_hidden.append(hidden)
        out = VLTextModelOutput(
            last_hidden_state=hidden,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if want_hidden else None,
            attentions=tuple(attentions) if want_attentions else None,
            router_logits=tuple(routers) if output_router_logits and routers else None,
        )
        return out if _flag(return_dict, self.config, "return_dict") else out.to_tuple()


def local_part(
    bounds: tuple[int, int],
    hidden: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    visual_pos_masks: torch.Tensor | None,
    deepstack: list[torch.Tensor] | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None, list[torch.Tensor] | None]:
    """Positions ``[start, stop)`` of the decoder's inputs: hidden states, rotary tables, DeepStack targets.

    The DeepStack features ``[V, H]`` follow the visual positions in row-major order, so the part keeps
    the features of the visual positions inside ``[start, stop)``, in the same order.
    """
    start, stop = bounds
    cos, sin = cos_sin
    part = (hidden[:, start:stop], (cos[:, start:stop], sin[:, start:stop]))
    if visual_pos_masks is None or deepstack is None:
        return *part, visual_pos_masks, deepstack
    inside = torch.zeros_like(visual_pos_masks)
    inside[:, start:stop] = visual_pos_masks[:, start:stop]
    keep = inside[visual_pos_masks]
    return *part, visual_pos_masks[:, start:stop], [f[keep] for f in deepstack]


def add_at_positions(hidden: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``hidden [B, L, H]`` with ``features [V, H]`` added at the ``V`` True entries of ``mask [B, L]``."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    index = mask.reshape(-1).nonzero().squeeze(-1)
    return flat.index_add(0, index, features.to(flat.dtype)).view_as(hidden)
