"""The assembled VLM: vision tower + decoder, with placeholder scatter, MRoPE positions and DeepStack.

Follows the Qwen3-VL technical report (arXiv 2511.21631, section 2): the ``vl_vision`` tower turns
patches into merged tokens (and DeepStack features) that replace the ``<|image_pad|>`` /
``<|video_pad|>`` placeholders; positions are 3-D interleaved-MRoPE ids from
``vl_rope.get_rope_index(style="qwen3_vl")``; the decoder (``vl_model.text``) adds the DeepStack
features at visual positions after its first layers. State-dict keys equal transformers'
``Qwen3VLForConditionalGeneration`` (``model.visual.*``, ``model.language_model.*``, ``lm_head.weight``).

The classes behave as transformers' ``Qwen3VL(Moe)ForConditionalGeneration`` / ``Qwen3VL(Moe)Model``
wherever user code can tell (outputs, tuples, config switches, feature getters, generation). The one
addition on the loss: ``return_logits=False`` with ``labels`` projects the vocabulary (the largest
matmul in training) on the labelled positions only and returns no logits.

Notation: ``B`` batch, ``L`` sequence, ``H`` hidden size, ``V`` vocabulary, ``N`` visual tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache

from vl_moe import load_balancing_loss
from vl_vision import VisionOutput

from ._inputs import (
    VLCausalLMOutput,
    VLModelOutput,
    VLVisionFeatures,
    check_finite_pixels,
    check_pairs,
    check_token_ids,
    join_deepstack,
    segments_from_cu_seqlens,
    vision_output_from,
)
from ._loss import causal_lm_loss, labelled_loss
from ._positions import continued_positions, generation_position_ids, rope_index
from ._vision import VISION_ATTN, VLVisionTower
from ._vision_pass import encode_visual
from .configuration import VLConfig
from .runtime import CoreRuntime
from .text import VLPreTrainedModel, VLTextModel

__all__ = [
    "VLCausalLMOutput",
    "VLForConditionalGeneration",
    "VLModel",
    "VLModelOutput",
    "VLPreTrainedModel",
    "VLVisionFeatures",
]


def _requested(given: bool | None, config: Any, name: str) -> bool | None:
    """An ``output_*`` switch for the decoder: the argument, True when the top config sets it, else None.

    None lets the decoder read its own config (``text_config``), as transformers' Qwen3-VL does.
    """
    if given is not None:
        return given
    return True if getattr(config, name, False) else None


class VLModel(VLPreTrainedModel):
    """Vision tower (``visual``) + decoder (``language_model``); returns the decoder's hidden states."""

    def __init__(self, config: VLConfig) -> None:
        super().__init__(config)
        name = config.vision_config._attn_implementation or config._attn_implementation or "sdpa"
        tower_config = config.vision_config.to_vision_config(attn_implementation=VISION_ATTN.get(name, "sdpa"))
        self.visual = VLVisionTower(tower_config, attn_implementation=name)
        self.language_model = VLTextModel(config.text_config)
        self.rope_deltas: torch.Tensor | None = None
        # True: every fresh forward runs the tower once, a zero-weighted placeholder image when the batch has
        # no pixels, so that the ranks of a sharded tower run the same collectives (see _vision_pass)
        self.uniform_vision_pass = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.embed_tokens = value  # type: ignore[assignment]

    def _encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, kind: str) -> VisionOutput:
        """Merged tokens ``[N, H]`` and DeepStack features of all images (or videos), concatenated."""
        check_pairs(pixel_values, grid_thw, kind)
        check_finite_pixels(pixel_values, kind, training=self.training)
        return self.visual(pixel_values.to(self.visual.dtype), grid_thw)

    def _features(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, kind: str, return_dict: bool | None
    ) -> VLVisionFeatures | tuple[Any, ...]:
        out = self._encode(pixel_values, grid_thw, kind)
        sizes = (grid_thw.long().prod(-1) // self.visual.spatial_merge_size**2).tolist()
        features = VLVisionFeatures(
            last_hidden_state=out.last_hidden_state,
            pooler_output=torch.split(out.merged, sizes),
            deepstack_features=[torch.split(f, sizes) for f in out.deepstack],
        )
        wants_dict = self.config.return_dict if return_dict is None else return_dict
        return features if wants_dict else features.to_tuple()

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> VLVisionFeatures | tuple[Any, ...]:
        """The images' tower output, merged tokens and DeepStack features, as transformers returns them.

        Args:
            pixel_values: ``[N, C*T*P*P]`` patches of all images.
            image_grid_thw: ``[n, 3]`` their grids.
            return_dict: False returns ``to_tuple()``; default: the config's ``return_dict``.
            **kwargs: Accepted for transformers' signature; unused.

        Returns:
            ``VLVisionFeatures`` (``last_hidden_state [N, D]``, ``pooler_output``: one ``[N_i / m^2, H]`` per
            image, ``deepstack_features``: per layer, one ``[N_i / m^2, H]`` per image).
        """
        if image_grid_thw is None:
            raise ValueError("get_image_features needs image_grid_thw with the pixel_values")
        return self._features(pixel_values, image_grid_thw, "image", return_dict)

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        video_grid_thw: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> VLVisionFeatures | tuple[Any, ...]:
        """Like ``get_image_features`` for videos (one entry per video, all its temporal patches)."""
        if video_grid_thw is None:
            raise ValueError("get_video_features needs video_grid_thw with the pixel_values_videos")
        return self._features(pixel_values_videos, video_grid_thw, "video", return_dict)

    def get_rope_index(
        self,
        input_ids: torch.Tensor,
        mm_token_type_ids: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([3, B, L] MRoPE positions, [B, 1] deltas)`` of a prompt, as transformers' ``get_rope_index``.

        ``mm_token_type_ids`` (0 text, 1 image, 2 video) may be omitted: the placeholder ids tell the
        modality. Padding (``attention_mask == 0``) takes position 0 and no vision grid; ``segment_ids=``
        (packed rows) restarts the positions at every sample.
        """
        return rope_index(
            self.config,
            input_ids,
            mm_token_type_ids,
            image_grid_thw,
            video_grid_thw,
            attention_mask,
            segment_ids=kwargs.get("segment_ids"),
        )

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
        if input_ids is not None and past == 0:
            position_ids, deltas = self.get_rope_index(
                input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask, segment_ids=segment_ids
            )
            if segment_ids is None:
                self.rope_deltas = deltas
            return position_ids
        batch, length = inputs_embeds.shape[:2]
        return continued_positions(self.rope_deltas, batch, length, past, attention_mask, inputs_embeds.device)

    def _visual_inputs(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        images: VisionOutput | None,
        videos: VisionOutput | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """Scatter the merged tokens into the placeholders; the visual positions and DeepStack features."""
        image_mask = video_mask = None
        if images is not None:
            image_mask = self._placeholder_mask(input_ids, inputs_embeds, self.config.image_token_id)
            inputs_embeds = self._scatter(inputs_embeds, image_mask, images.merged, "image")
        if videos is not None:
            video_mask = self._placeholder_mask(input_ids, inputs_embeds, self.config.video_token_id)
            inputs_embeds = self._scatter(inputs_embeds, video_mask, videos.merged, "video")
        visual_pos_masks, deepstack = join_deepstack(image_mask, images, video_mask, videos)
        return inputs_embeds, visual_pos_masks, deepstack

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
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> VLModelOutput | tuple[Any, ...]:
        """Embed, encode and scatter the visual inputs, compute MRoPE positions and run the decoder.

        Args:
            input_ids: ``[B, L]`` with ``image_token_id`` / ``video_token_id`` placeholder runs.
            attention_mask: ``[B, S]`` (1 = token, 0 = padding; left or right).
            position_ids: ``[3, B, L]`` (or ``[4, B, L]``, ``[B, L]``); computed when absent. ``[B, L]`` text
                positions that restart without an ``attention_mask`` mark packed samples (see ``VLTextModel``).
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
            output_hidden_states: Return the decoder's hidden states (default: this config's or
                ``text_config``'s ``output_hidden_states``).
            output_router_logits: Return the MoE router logits.
            output_attentions: Return the decoder's attention probabilities (eager attention; default: the
                configs' ``output_attentions``).
            return_dict: False returns ``to_tuple()`` (default: the config's ``return_dict``).
            mm_encoder_outputs: ``{"image": ..., "video": ...}`` features from ``get_image_features`` /
                ``get_video_features`` instead of pixels (what transformers' ``generate`` passes).
            **kwargs: Passed to the attention function.

        Raises:
            ValueError: Patches without grids (or grids without patches), placeholder counts that differ
                from the number of visual features (both numbers named), or a token id outside the vocabulary.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        check_pairs(pixel_values, image_grid_thw, "image")
        check_pairs(pixel_values_videos, video_grid_thw, "video")
        encoded = dict(mm_encoder_outputs or {})
        if (pixel_values is not None and encoded.get("image") is not None) or (
            pixel_values_videos is not None and encoded.get("video") is not None
        ):
            raise ValueError("give the pixels or mm_encoder_outputs for a modality, not both")
        ref = input_ids if input_ids is not None else inputs_embeds
        assert ref is not None
        if cu_seqlens is not None and segment_ids is None:
            segment_ids = segments_from_cu_seqlens(cu_seqlens, ref.shape[0], ref.shape[1])
        if inputs_embeds is None:
            assert input_ids is not None
            table = self.get_input_embeddings()
            vocab = getattr(table, "num_embeddings", None)
            if vocab is not None:
                check_token_ids(input_ids, int(vocab), training=self.training)
            inputs_embeds = table(input_ids)
        assert inputs_embeds is not None
        for pixels, kind in ((pixel_values, "image"), (pixel_values_videos, "video")):
            if pixels is not None:
                check_finite_pixels(pixels, kind, training=self.training)
        fresh = past_key_values is None or past_key_values.get_seq_length() == 0
        visual = encode_visual(
            self.visual,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            placeholder=self.uniform_vision_pass and fresh,
        )
        images, videos = visual.images, visual.videos
        if images is None and encoded.get("image") is not None:
            images = vision_output_from(encoded["image"])
        if videos is None and encoded.get("video") is not None:
            videos = vision_output_from(encoded["video"])
        if visual.anchor is not None:  # a placeholder pass: zero, but every tower unit is in the graph
            inputs_embeds = inputs_embeds + visual.anchor.to(inputs_embeds.dtype)
        inputs_embeds, visual_pos_masks, deepstack = self._visual_inputs(input_ids, inputs_embeds, images, videos)

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
            output_hidden_states=_requested(output_hidden_states, self.config, "output_hidden_states"),
            output_router_logits=output_router_logits,
            output_attentions=_requested(output_attentions, self.config, "output_attentions"),
            return_dict=True,
            **kwargs,
        )
        result = VLModelOutput(
            last_hidden_state=out.last_hidden_state,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            router_logits=out.router_logits,
        )
        return result if (self.config.return_dict if return_dict is None else return_dict) else result.to_tuple()


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

        As in transformers, weights the checkpoint lacks are initialised (the load report names them)
        and unused ones are reported; ``from_pretrained(None, config=..., state_dict=...)`` builds the model
        from an in-memory state dict (either key layout).

        Args:
            pretrained_model_name_or_path: A local folder, a Hub repo id (the Hugging Face cache is used;
                ``HF_HUB_OFFLINE=1`` works with a populated cache), or None with ``config`` and ``state_dict``.
            *model_args: Passed to transformers' ``from_pretrained``.
            allow_pickle: Accept ``pytorch_model.bin`` files (read with ``weights_only=True``).
            **kwargs: transformers' ``from_pretrained`` options (``dtype``, ``attn_implementation``,
                ``cache_dir``, ``revision``, ``output_loading_info``, ``state_dict``, ...).

        Raises:
            ValueError: A pickled checkpoint without ``allow_pickle``, or a malformed index or a truncated shard
                (the file is named).
            FileNotFoundError: No weights, or an index naming a shard the folder lacks.
            RuntimeError: Tensors whose shapes differ from the model's (transformers' load report lists them).
        """
        from .checkpoint import load_pretrained

        return load_pretrained(cls, pretrained_model_name_or_path, model_args, allow_pickle=allow_pickle, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """See ``VLModel.get_image_features``."""
        return self.model.get_image_features(pixel_values, image_grid_thw, **kwargs)

    def get_video_features(
        self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """See ``VLModel.get_video_features``."""
        return self.model.get_video_features(pixel_values_videos, video_grid_thw, **kwargs)

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
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = True,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> VLCausalLMOutput | tuple[Any, ...]:
        """Logits and, with ``labels``, the loss of the VLM; see ``VLModel.forward`` for the inputs.

        Args:
            labels: ``[B, L]`` next-token targets aligned with ``input_ids`` (shifted inside), -100 = ignored.
            logits_to_keep: ``k > 0`` keeps the last ``k`` positions' logits (``1`` while generating);
                a 1-D tensor keeps those sequence indices.
            return_logits: False with ``labels``: project the vocabulary only at the labelled positions and
                return ``logits=None`` (the fast path for training loops that need only the loss).
            shift_labels: ``[B, L]`` targets already aligned with the positions, used instead of shifting
                ``labels`` (transformers' ``Trainer`` / TRL context parallelism); the loss is computed
                when ``labels`` are given, as in transformers.
            num_items_in_batch: Divide the summed loss by this (gradient accumulation) instead of the
                local count of labelled tokens.
            output_router_logits: MoE: return router logits and ``aux_loss``; with ``labels`` the loss gains
                ``router_aux_loss_coef`` x the balance loss. Default: ``text_config.output_router_logits``.
            output_attentions: Return each layer's attention probabilities (eager attention only).
            return_dict: False returns ``to_tuple()``, the tuple transformers returns. Default: the config's.

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
            output_attentions=output_attentions,
            return_dict=True,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden = out.last_hidden_state
        assert hidden is not None
        loss = logits = None
        whole = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if labels is None or return_logits:
            kept = (
                hidden
                if whole
                else (hidden[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else hidden[:, logits_to_keep])
            )
            logits = self.lm_head(kept)
        if labels is not None:
            if logits is not None and whole:
                loss = causal_lm_loss(logits, labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            else:
                loss = self.supervised_loss(hidden, labels, num_items_in_batch, shift_labels=shift_labels)
        aux = None
        if want_router and out.router_logits:
            mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            if mask is not None and mask.shape[1] != hidden.shape[1]:
                mask = mask[:, -hidden.shape[1] :]
            # transformers pools the assignment shares and router probabilities over all MoE layers before
            # taking their product (one loss over the layers' tokens together), not a mean of per-layer losses
            layers = len(out.router_logits)
            aux = load_balancing_loss(
                torch.cat(list(out.router_logits)),
                text_cfg.num_experts_per_tok,
                attention_mask=None if mask is None else mask.reshape(1, -1).expand(layers, -1),
            )
            if loss is not None:
                loss = loss + text_cfg.router_aux_loss_coef * aux.to(loss.dtype)
        result = VLCausalLMOutput(
            loss=loss,
            aux_loss=aux,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            router_logits=out.router_logits,
        )
        return result if (self.config.return_dict if return_dict is None else return_dict) else result.to_tuple()

    def supervised_loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None = None,
        *,
        shift_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token cross-entropy projecting only the labelled positions ``[B, L, H] -> scalar``.

        Equals the loss of ``forward(labels=...)`` but never materialises ``[B, L, V]`` logits.
        """
        return labelled_loss(
            hidden, self.lm_head, labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch
        )

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """3-D MRoPE positions of the prompt (or of a cached prompt's continuation); see ``_generation``."""
        text = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        return generation_position_ids(self, inputs_tensor, model_kwargs, text)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> Any:
        """Generation step inputs: pixels and grids go in only on the first (prefill) step.

        The explicit signature tells ``generate`` that a prompt may come as ``inputs_embeds``.
        """
        inputs = super().prepare_inputs_for_generation(  # type: ignore[misc]
            input_ids,  # type: ignore[arg-type]
            next_sequence_length=next_sequence_length,
            past_key_values=past_key_values,
            attention_mask=attention_mask,  # type: ignore[arg-type]
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids"):
                inputs[key] = None
        return inputs
