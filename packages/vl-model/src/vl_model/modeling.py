"""The assembled VLM: vision tower + decoder, with placeholder scatter, MRoPE positions and DeepStack.

Follows the Qwen3-VL technical report (arXiv 2511.21631, section 2): the ``vl_vision`` tower turns
patches into merged tokens (and DeepStack features) that replace the ``<|image_pad|>`` /
``<|video_pad|>`` placeholders; positions are 3-D interleaved-MRoPE ids from
``vl_rope.get_rope_index(style="qwen3_vl")``; the decoder (``vl_model.text``) adds the DeepStack
features at visual positions after its first layers. State-dict keys equal transformers'
``Qwen3VLForConditionalGeneration`` (``model.visual.*``, ``model.language_model.*``, ``lm_head.weight``).

The loss is computed only where labels are set: the vocabulary projection (the largest matmul in
training) runs on the supervised positions alone.

Notation: ``B`` batch, ``L`` sequence, ``H`` hidden size, ``V`` vocabulary, ``N`` visual tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache

from vl_moe import load_balancing_loss
from vl_rope import decode_position_ids, get_rope_index
from vl_vision import VisionOutput, VisionTransformer

from ._inputs import (
    VLCausalLMOutput,
    VLModelOutput,
    check_pairs,
    join_deepstack,
    segments_from_cu_seqlens,
)
from .configuration import VLConfig
from .runtime import CoreRuntime
from .text import VISION_ATTN, VLPreTrainedModel, VLTextModel

__all__ = ["VLCausalLMOutput", "VLForConditionalGeneration", "VLModel", "VLModelOutput", "VLPreTrainedModel"]


class VLModel(VLPreTrainedModel):
    """Vision tower (``visual``) + decoder (``language_model``); returns the decoder's hidden states."""

    def __init__(self, config: VLConfig) -> None:
        super().__init__(config)
        impl = VISION_ATTN.get(config._attn_implementation or "sdpa", "sdpa")
        self.visual = VisionTransformer(config.vision_config.to_vision_config(attn_implementation=impl))
        self.language_model = VLTextModel(config.text_config)
        self.rope_deltas: torch.Tensor | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.embed_tokens = value  # type: ignore[assignment]

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionOutput:
        """Merged tokens ``[N, H]`` and DeepStack features of ``n`` images (all images concatenated)."""
        check_pairs(pixel_values, image_grid_thw, "image")
        dtype = self.visual.patch_embed.proj.weight.dtype
        return self.visual(pixel_values.to(dtype), image_grid_thw)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> VisionOutput:
        """Like ``get_image_features`` for videos (each temporal patch becomes its own token grid)."""
        check_pairs(pixel_values_videos, video_grid_thw, "video")
        dtype = self.visual.patch_embed.proj.weight.dtype
        return self.visual(pixel_values_videos.to(dtype), video_grid_thw)

    def _placeholder_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, token_id: int
    ) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == token_id
        probe = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == probe).all(-1)

    def _scatter(
        self,
        inputs_embeds: torch.Tensor,
        mask: torch.Tensor,
        features: torch.Tensor,
        kind: str,
    ) -> torch.Tensor:
        n_tokens, n_features = int(mask.sum()), features.shape[0]
        if n_tokens != n_features:
            raise ValueError(
                f"{kind} tokens and {kind} features do not match: the input holds {n_tokens} {kind} placeholder "
                f"tokens but the {kind}s give {n_features} features"
            )
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features.to(inputs_embeds.dtype))

    def compute_position_ids(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[3, B, L]`` MRoPE positions: from the prompt on the first pass, from the cached deltas after.

        With ``segment_ids`` (packed rows) positions restart at every sample and no deltas are kept.
        """
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        mask_2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if input_ids is not None and past == 0:
            position_ids, deltas = get_rope_index(
                input_ids,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                attention_mask=mask_2d,
                mm_token_type_ids=mm_token_type_ids,
                image_token_id=self.config.image_token_id,
                video_token_id=self.config.video_token_id,
                spatial_merge_size=self.config.vision_config.spatial_merge_size,
                style="qwen3_vl",
                segment_ids=segment_ids,
            )
            if segment_ids is None:
                self.rope_deltas = deltas
            return position_ids
        batch, length = inputs_embeds.shape[:2]
        cached = self.rope_deltas
        if cached is None or cached.shape[0] != batch:
            cached = torch.zeros(batch, 1, dtype=torch.long, device=inputs_embeds.device)
        return decode_position_ids(
            cached.to(inputs_embeds.device),
            past_length=past,
            num_new=length,
            attention_mask=None if mask_2d is None or mask_2d.shape[1] != past + length else mask_2d,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Any,
    ) -> VLModelOutput:
        """Embed, encode and scatter the visual inputs, compute MRoPE positions and run the decoder.

        Args:
            input_ids: ``[B, L]`` with ``image_token_id`` / ``video_token_id`` placeholder runs.
            attention_mask: ``[B, S]`` (1 = token, 0 = padding; left or right).
            position_ids: ``[3, B, L]`` (or ``[4, B, L]``, ``[B, L]``); computed when absent.
            past_key_values: A transformers ``Cache``.
            inputs_embeds: ``[B, L, H]`` instead of ``input_ids``.
            pixel_values: ``[N_img_patches, C*T*P*P]`` with ``image_grid_thw [n_images, 3]``.
            pixel_values_videos: ``[N_vid_patches, C*T*P*P]`` with ``video_grid_thw [n_videos, 3]``.
            image_grid_thw: Patch grids of the images.
            video_grid_thw: Patch grids of the videos.
            mm_token_type_ids: ``[B, L]`` modality per token (0 text, 1 image, 2 video), optional.
            segment_ids: ``[B, L]`` packed-sample ids: positions restart and attention stays per sample.
            cu_seqlens: ``[S + 1]`` cumulative sample lengths over the flattened ``B * L`` tokens, instead
                of ``segment_ids`` (tokens after the last sample count as padding).
            use_cache: Return a KV cache.
            output_hidden_states: Return every layer's hidden states.
            output_router_logits: Return the MoE router logits.
            **kwargs: Passed to the attention function.

        Raises:
            ValueError: Patches without grids (or grids without patches), or placeholder counts that
                differ from the number of visual features (both numbers named).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        check_pairs(pixel_values, image_grid_thw, "image")
        check_pairs(pixel_values_videos, video_grid_thw, "video")
        if cu_seqlens is not None and segment_ids is None:
            ref = input_ids if input_ids is not None else inputs_embeds
            assert ref is not None
            segment_ids = segments_from_cu_seqlens(cu_seqlens, ref.shape[0], ref.shape[1])
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        assert inputs_embeds is not None
        image_mask = video_mask = None
        image_out = video_out = None
        if pixel_values is not None and image_grid_thw is not None:
            image_out = self.get_image_features(pixel_values, image_grid_thw)
            image_mask = self._placeholder_mask(input_ids, inputs_embeds, self.config.image_token_id)
            inputs_embeds = self._scatter(inputs_embeds, image_mask, image_out.merged, "image")
        if pixel_values_videos is not None and video_grid_thw is not None:
            video_out = self.get_video_features(pixel_values_videos, video_grid_thw)
            video_mask = self._placeholder_mask(input_ids, inputs_embeds, self.config.video_token_id)
            inputs_embeds = self._scatter(inputs_embeds, video_mask, video_out.merged, "video")
        visual_pos_masks, deepstack = join_deepstack(image_mask, image_out, video_mask, video_out)

        if position_ids is None:
            position_ids = self.compute_position_ids(
                input_ids,
                inputs_embeds,
                attention_mask,
                past_key_values,
                image_grid_thw,
                video_grid_thw,
                mm_token_type_ids,
                segment_ids,
            )
        out = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            visual_pos_masks=visual_pos_masks,
            deepstack_visual_embeds=deepstack,
            segment_ids=segment_ids,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        return VLModelOutput(
            last_hidden_state=out.last_hidden_state,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            rope_deltas=self.rope_deltas,
            router_logits=out.router_logits,
        )


class VLForConditionalGeneration(CoreRuntime, VLPreTrainedModel, GenerationMixin):
    """``VLModel`` + ``lm_head``: the Hugging Face image-text-to-text model (generate, loss, Auto classes)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}  # noqa: RUF012
    accepts_loss_kwargs = True

    def __init__(self, config: VLConfig) -> None:
        super().__init__(config)
        self.model = VLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Any, *model_args: Any, allow_pickle: bool = False, **kwargs: Any
    ) -> Any:
        """Load our format (``model_type="vl"``) or an official ``qwen3_vl`` / ``qwen3_vl_moe`` checkpoint.

        Args:
            pretrained_model_name_or_path: A local folder or a Hub repo id (the Hugging Face cache is
                used; ``HF_HUB_OFFLINE=1`` works with a populated cache).
            *model_args: Passed to transformers' ``from_pretrained``.
            allow_pickle: Accept ``pytorch_model.bin`` files (read with ``weights_only=True``).
            **kwargs: transformers' ``from_pretrained`` options (``dtype``, ``attn_implementation``,
                ``cache_dir``, ``revision``, ...).

        Raises:
            ValueError: Missing or unexpected keys (listed), or a pickled checkpoint without ``allow_pickle``.
        """
        from .checkpoint import load_pretrained

        return load_pretrained(cls, pretrained_model_name_or_path, model_args, allow_pickle=allow_pickle, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionOutput:
        """See ``VLModel.get_image_features``."""
        return self.model.get_image_features(pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> VisionOutput:
        """See ``VLModel.get_video_features``."""
        return self.model.get_video_features(pixel_values_videos, video_grid_thw)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> VLCausalLMOutput:
        """Logits (or the loss on labelled positions) of the VLM; see ``VLModel.forward`` for the inputs.

        Args:
            labels: ``[B, L]`` next-token targets aligned with ``input_ids`` (shifted inside), -100 = ignored.
            logits_to_keep: ``k > 0`` keeps the last ``k`` positions' logits (``1`` while generating);
                a 1-D tensor keeps those sequence indices.
            return_logits: With ``labels``, also compute the full logits.
            num_items_in_batch: Divide the summed loss by this (gradient accumulation) instead of the
                local count of labelled tokens.
            output_router_logits: MoE: return router logits and add ``router_aux_loss_coef`` x balance loss.

        The other arguments are those of ``VLModel.forward``.
        """
        text_cfg = self.config.text_config
        want_router = text_cfg.output_router_logits if output_router_logits is None else output_router_logits
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            segment_ids=segment_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_logits=want_router,
            **kwargs,
        )
        hidden = out.last_hidden_state
        assert hidden is not None
        loss = logits = None
        if labels is not None:
            loss = self.supervised_loss(hidden, labels, num_items_in_batch)
        if labels is None or return_logits:
            if isinstance(logits_to_keep, int):
                kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
            else:
                kept = hidden[:, logits_to_keep]
            logits = self.lm_head(kept)
        aux = None
        if want_router and out.router_logits:
            mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            if mask is not None and mask.shape[1] != hidden.shape[1]:
                mask = mask[:, -hidden.shape[1] :]
            aux = load_balancing_loss(list(out.router_logits), text_cfg.num_experts_per_tok, attention_mask=mask)
            if loss is not None:
                loss = loss + text_cfg.router_aux_loss_coef * aux.to(loss.dtype)
        return VLCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            rope_deltas=out.rope_deltas,
            aux_loss=aux,
            router_logits=out.router_logits,
        )

    def supervised_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Next-token cross-entropy projecting only the labelled positions ``[B, L, H] -> scalar``.

        Equals the usual shifted mean cross-entropy but never materialises ``[B, L, V]`` logits.
        """
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != -100
        picked = hidden[:, :-1][keep]
        logits = self.lm_head(picked).float()
        total = F.cross_entropy(logits, targets[keep], reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
        if isinstance(denom, torch.Tensor):
            denom = denom.to(total.device)
        return total / denom

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """3-D MRoPE positions of the prompt; generate then continues each axis by one per token."""
        ids = model_kwargs.get("input_ids", inputs_tensor)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.shape[1] == 0:
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        mask = model_kwargs.get("attention_mask")
        position_ids, deltas = get_rope_index(
            ids,
            image_grid_thw=model_kwargs.get("image_grid_thw"),
            video_grid_thw=model_kwargs.get("video_grid_thw"),
            attention_mask=mask if mask is not None and mask.dim() == 2 else None,
            mm_token_type_ids=model_kwargs.get("mm_token_type_ids"),
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            spatial_merge_size=self.config.vision_config.spatial_merge_size,
            style="qwen3_vl",
        )
        self.model.rope_deltas = deltas
        return position_ids

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        """Generation step inputs: pixels and grids go in only on the first (prefill) step."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)  # type: ignore[misc]
        if not kwargs.get("is_first_iteration", False) and kwargs.get("use_cache", True):
            for key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids"):
                inputs[key] = None
        return inputs
