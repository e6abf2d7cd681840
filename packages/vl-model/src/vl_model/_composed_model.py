"""A VLM composed from parts: our vision tower + merger(s) and any Hugging Face causal LM.

Implements the Qwen3-VL recipe (arXiv 2511.21631 section 2) on top of an arbitrary decoder:
merged vision tokens replace the image/video placeholders in the LM's input embeddings, and
the DeepStack features (DeepStack, arXiv 2406.04334) are added to the hidden states at the
visual positions after the LM's decoder layers ``0 .. k-1``. The LM is used as a black box
through ``inputs_embeds``; DeepStack goes in through forward hooks on its layers list, so
Qwen3, Qwen2, Llama and any model with ``model.layers`` / ``get_decoder().layers`` work.

Positions: ``position_style="1d"`` keeps the LM's own rotary (one position per token);
``"mrope"`` replaces the LM's shared ``rotary_emb`` with Qwen3-VL's interleaved MRoPE fed by
``vl_rope.get_rope_index`` (3-D positions; ``rope_deltas`` continue them while decoding).

Notation: ``B`` batch, ``L`` sequence length, ``D`` LM width, ``V`` visual tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from vl_rope import VisionRoPE2D, get_rope_index
from vl_vision import VisionTransformer

from ._composed_config import ComposedVLConfig
from ._composed_hooks import DeepStackInjector, MRoPERotary, decoder_layers, install_mrope
from ._vision_pass import encode_visual
from .runtime import HiddenStates, MoERouting, check_part, moe_routing_of, segment_positions, tower_parts

__all__ = ["ComposedVLForConditionalGeneration"]


class ComposedVLForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Vision tower (``visual``) + any HF causal LM (``language_model``), with DeepStack.

    Args:
        config: The composed config.
        visual: An existing tower to use (else one is built from ``config.vision_config``).
        language_model: An existing causal LM to use (else built with
            ``AutoModelForCausalLM.from_config(config.text_config)``).
    """

    config_class = ComposedVLConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ["image", "video", "text"]  # noqa: RUF012 (the base class declares it a list)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]  # noqa: RUF012 (an instance variable of the base class)

    def __init__(
        self,
        config: ComposedVLConfig,
        *,
        visual: VisionTransformer | None = None,
        language_model: PreTrainedModel | None = None,
    ) -> None:
        super().__init__(config)
        given_lm = language_model is not None
        for part in (visual, language_model):
            if part is not None:  # already initialised (maybe trained): post_init must leave it alone
                for module in part.modules():
                    module._is_hf_initialized = True  # type: ignore[assignment]
        self.visual = visual if visual is not None else VisionTransformer(config.vision)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        self._deepstack = DeepStackInjector()
        self._deepstack.attach(decoder_layers(language_model), len(self.visual.deepstack_merger_list))
        self._mrope: MRoPERotary | None = None
        self.rope_deltas: torch.Tensor | None = None
        # True: every fresh forward runs the tower once, a zero-weighted placeholder image when the batch has
        # no pixels, so that the ranks of a sharded tower run the same collectives (vl_train.parallel sets it)
        self.uniform_vision_pass = False
        self._install_positions()
        self.post_init()
        if given_lm:  # composed from parts: generate uses this LM's tokens
            self._take_token_ids(language_model)

    def _install_positions(self) -> None:
        if self.config.position_style == "mrope":
            self._mrope = install_mrope(self.language_model, self.config.mrope_section)
            self.config.mrope_section = self._mrope.mrope_section

    def _init_weights(self, module: nn.Module) -> None:
        # The tower initialises itself in its constructor and the LM with its own `_init_weights`
        # (transformers dispatches sub-models to theirs), so nothing is left to do here.
        return None

    # ------------------------------------------------------------------ LM delegation

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def attach_language_model(self, language_model: PreTrainedModel) -> None:
        """Install ``language_model`` (hooks moved to its layers, ``config.text_config`` updated).

        Checks come first (layers, MRoPE), so a refused LM leaves the model unchanged.
        """
        layers = decoder_layers(language_model)
        if len(self.visual.deepstack_merger_list) > len(layers):
            raise ValueError(
                f"{len(self.visual.deepstack_merger_list)} DeepStack mergers but the language model has only "
                f"{len(layers)} layers"
            )
        mrope = None
        if self.config.position_style == "mrope":
            mrope = install_mrope(language_model, self.config.mrope_section)
        self._deepstack.attach(layers, len(self.visual.deepstack_merger_list))
        for module in language_model.modules():  # keep its weights when post_init runs again
            module._is_hf_initialized = True  # type: ignore[assignment]
        self.language_model = language_model
        self._mrope, self.rope_deltas = mrope, None
        self.config.text_config = language_model.config
        self.config.tie_word_embeddings = bool(getattr(language_model.config, "tie_word_embeddings", False))
        self.post_init()
        self._take_token_ids(language_model)

    def _take_token_ids(self, language_model: PreTrainedModel) -> None:
        # generate() must stop and pad with this LM's tokens: after a swap to an LM with another
        # tokenizer, the previous LM's ids are other tokens of the new vocabulary
        source = getattr(language_model, "generation_config", None) or language_model.config
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(self.generation_config, key, getattr(source, key, None))

    # ------------------------------------------------------------------ vision

    def _vision_rope_ready(self) -> None:
        # `from_pretrained` builds the model on the meta device; the tower keeps its rotary
        # frequencies out of the state dict, so they are rebuilt here once.
        rope = self.visual._rope[0]
        if rope.inv_freq.is_meta:
            cfg = self.visual.config
            self.visual._rope = (VisionRoPE2D(cfg.head_dim, cfg.rope_theta, cfg.spatial_merge_size),)

    def encode_vision(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Merged tokens ``[V, D]`` and DeepStack features (``[V, D]`` each) of images or videos."""
        self._vision_rope_ready()
        out = self.visual(pixel_values.to(self.visual.dtype), grid_thw)
        return out.merged, list(out.deepstack)

    def _scatter(
        self,
        inputs_embeds: torch.Tensor,
        mask: torch.Tensor,
        merged: torch.Tensor,
        kind: str,
    ) -> torch.Tensor:
        n_tokens, n_features = int(mask.sum()), merged.shape[0]
        if n_tokens != n_features:
            raise ValueError(
                f"{kind} features and {kind} tokens do not match: {n_tokens} {kind} placeholder tokens in the "
                f"input but the vision tower produced {n_features} {kind} features"
            )
        return inputs_embeds.masked_scatter(mask[..., None], merged.to(inputs_embeds.dtype))

    def _placeholder_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, token_id: int
    ) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == token_id
        # Without ids, a placeholder is a position whose embedding is the placeholder's embedding.
        ref = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == ref.to(inputs_embeds.dtype)).all(-1)

    def _embed(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        pixel_values_videos: torch.Tensor | None,
        video_grid_thw: torch.Tensor | None,
        *,
        fresh: bool = True,
    ) -> torch.Tensor:
        """Token embeddings with the visual placeholders replaced; arms the DeepStack hooks.

        ``fresh``: a forward without cached tokens (training, prefill), where ``uniform_vision_pass``
        runs a placeholder image when there are no pixels.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        self._deepstack.features, self._deepstack.positions = [], None
        cfg = self.config
        for kind, pixels, grid in (
            ("image", pixel_values, image_grid_thw),
            ("video", pixel_values_videos, video_grid_thw),
        ):
            if (pixels is None) != (grid is None):
                have, lack = ("pixels", "grid_thw") if grid is None else ("grid_thw", "pixels")
                raise ValueError(f"{kind} {have} given without {kind} {lack}: pass both or neither")
        self._vision_rope_ready()
        visual = encode_visual(
            self.visual,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            placeholder=self.uniform_vision_pass and fresh,
        )
        if visual.anchor is not None:  # a placeholder pass: zero, but every tower unit is in the graph
            inputs_embeds = inputs_embeds + visual.anchor.to(inputs_embeds.dtype)
        visual_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        parts: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        for kind, out, token_id in (
            ("image", visual.images, cfg.image_token_id),
            ("video", visual.videos, cfg.video_token_id),
        ):
            if out is None:
                continue
            mask = self._placeholder_mask(input_ids, inputs_embeds, token_id)
            inputs_embeds = self._scatter(inputs_embeds, mask, out.merged, kind)
            visual_mask = visual_mask | mask
            parts.append((mask, list(out.deepstack)))
        if parts and parts[0][1]:
            # DeepStack features in the order of the visual positions (images and videos may interleave).
            n_visual = int(visual_mask.sum())
            features = []
            for layer in range(len(parts[0][1])):
                full = inputs_embeds.new_zeros(n_visual, inputs_embeds.shape[-1])
                for mask, deepstack in parts:
                    full = full.index_put((mask[visual_mask],), deepstack[layer].to(full.dtype))
                features.append(full)
            self._deepstack.features = features
            self._deepstack.positions = visual_mask.nonzero(as_tuple=True)  # type: ignore[assignment]
        return inputs_embeds

    # ------------------------------------------------------------------ training interface (vl_model.runtime)

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
        """The LM decoder's last hidden states ``[B, L, D]`` (see ``vl_model.runtime.TrainableVLM``).

        Packed rows (``segment_ids``): every sample's positions restart at 0 (MRoPE positions restart
        too) and the padding mask is dropped, so the LM's own masking (transformers detects packed
        samples from position restarts) keeps each sample's attention to itself, for every attention
        implementation.
        """
        embeds = self._embed(input_ids, None, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        lm_positions = position_ids
        if segment_ids is not None:
            lm_positions, attention_mask = segment_positions(segment_ids), None
        if self._mrope is not None:
            if position_ids is not None and position_ids.ndim == 3:
                lm_positions, self._mrope.positions = self._mrope_positions(
                    input_ids, embeds, attention_mask, position_ids, None, image_grid_thw, video_grid_thw
                )
            else:
                self._mrope.positions, _ = self._rope_index(
                    input_ids, image_grid_thw, video_grid_thw, attention_mask, segment_ids
                )
        extra: dict[str, Any] = {"output_router_logits": True} if output_router_logits else {}
        try:
            out = self.get_decoder()(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=lm_positions,
                use_cache=False,
                return_dict=True,  # whatever the LM's config says: the fields are read by name
                **extra,
            )
        finally:
            if self._mrope is not None:
                self._mrope.positions = None
            if not torch.is_grad_enabled():
                self._deepstack.features, self._deepstack.positions = [], None
        logits = getattr(out, "router_logits", None)
        return HiddenStates(out.last_hidden_state, tuple(logits) if output_router_logits and logits else None)

    def output_weight(self) -> torch.Tensor:
        """The LM's output projection ``[V, D]``."""
        head = self.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(self.language_model).__name__} has no output embeddings (not a causal LM)")
        return head.weight  # type: ignore[return-value]

    def decoder_layers(self) -> nn.ModuleList:
        """The LM's decoder layers."""
        return decoder_layers(self.language_model)

    def vision_tower(self) -> nn.Module:
        """Our vision tower (``blocks``, ``merger``, ``deepstack_merger_list``)."""
        return self.visual

    def part_modules(self, part: str) -> list[nn.Module | nn.Parameter]:
        """The modules of one part (``llm``: the whole causal LM, its head included)."""
        check_part(part)
        return [self.language_model] if part == "llm" else tower_parts(self.visual, part)

    def moe_routing(self) -> MoERouting | None:
        """The LM's MoE routing (``num_experts`` / ``num_experts_per_tok`` in its config), else ``None``."""
        return moe_routing_of(self.language_model.config)

    # ------------------------------------------------------------------ forward

    def _mrope_positions(
        self,
        input_ids: torch.Tensor | None,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values: Any,
        image_grid_thw: torch.Tensor | None,
        video_grid_thw: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(1-D positions for the LM or None, [3, B, L] MRoPE positions)``.

        ``position_ids`` may be ``[4, B, L]`` (text row + 3 MRoPE rows, what ``generate`` passes),
        ``[3, B, L]``, ``[B, L]`` or ``None``. Without 3-D positions: from the grids at prefill
        (``vl_rope.get_rope_index``), ``past + arange + rope_deltas`` when decoding.
        """
        if position_ids is not None and position_ids.ndim == 3:
            if position_ids.shape[0] == 4:
                return position_ids[0], position_ids[1:]
            return None, position_ids
        past = int(past_key_values.get_seq_length()) if past_key_values is not None else 0
        if past == 0 and input_ids is not None:
            positions, self.rope_deltas = self._rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask)
            return position_ids, positions
        batch, length = embeds.shape[:2]
        steps = torch.arange(past, past + length, device=embeds.device).expand(batch, -1)
        if past > 0 and self.rope_deltas is not None:
            # Text after the prompt: one step per token on all axes, shifted by the prompt's delta.
            steps = steps + self.rope_deltas.to(steps.device)
        return position_ids, steps[None].expand(3, -1, -1)

    @staticmethod
    def _mask_2d(attention_mask: Any) -> torch.Tensor | None:
        return attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 else None

    def _rope_index(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor | None,
        video_grid_thw: torch.Tensor | None,
        attention_mask: Any,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MRoPE positions ``[3, B, L]`` and ``rope_deltas`` of a batch (``vl_rope.get_rope_index``)."""
        return get_rope_index(
            input_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=self._mask_2d(attention_mask),
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            spatial_merge_size=self.visual.config.spatial_merge_size,
            segment_ids=segment_ids,
        )

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict[str, Any]) -> Any:
        """With MRoPE: ``[4, B, L]`` (text positions + the 3 MRoPE rows), which ``generate`` then
        advances by one per new token on every row (text after the prompt)."""
        text = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        ids = model_kwargs.get("input_ids")
        ids = ids if isinstance(ids, torch.Tensor) and ids.shape[-1] > 0 else inputs_tensor
        cache = model_kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None else 0
        if self._mrope is None or past or ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            return text
        positions, self.rope_deltas = self._rope_index(
            ids,
            model_kwargs.get("image_grid_thw"),
            model_kwargs.get("video_grid_thw"),
            model_kwargs.get("attention_mask"),
        )
        return torch.cat([text.expand(ids.shape[0], -1)[None].to(positions), positions], dim=0)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """GenerationMixin's inputs; the grids go with the pixels (prefill only)."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)  # type: ignore[misc]
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if inputs.get(pixels) is None:
                inputs.pop(grid, None)
        return inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Embed, inject the vision tokens, run the LM (loss from ``labels`` by the LM).

        Args:
            input_ids: ``[B, L]`` token ids with ``image_token_id`` / ``video_token_id`` runs.
            attention_mask: ``[B, L]`` padding mask (left padding works).
            position_ids: ``[B, L]`` positions (the LM's default when ``None``).
            past_key_values: The LM's KV cache.
            inputs_embeds: ``[B, L, D]`` instead of ``input_ids``.
            labels: ``[B, L]`` targets (``-100`` ignored); the LM shifts them.
            pixel_values: ``[N, C*T*P*P]`` image patches (``vl_vision.ImageProcessor``).
            pixel_values_videos: ``[N', C*T*P*P]`` video patches.
            image_grid_thw: ``[n, 3]`` image grids.
            video_grid_thw: ``[n', 3]`` video grids.
            use_cache: Return the KV cache.
            logits_to_keep: Compute logits only for the last ``k`` positions (``0``: all).
            mm_token_type_ids: ``[B, L]`` modality per token from ``VLProcessor``. Accepted so that a
                processor's output can be passed whole (also to ``generate``), and not used: the
                positions come from ``input_ids`` and the grids. It is not passed to the LM.
            **kwargs: Passed to the LM.

        Returns:
            The LM's ``CausalLMOutputWithPast``.

        Raises:
            ValueError: placeholder counts that differ from the feature counts (both named),
                grids without pixels or pixels without grids.
        """
        fresh = past_key_values is None or int(past_key_values.get_seq_length()) == 0
        embeds = self._embed(
            input_ids, inputs_embeds, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, fresh=fresh
        )
        if self._mrope is not None:
            lm_positions, self._mrope.positions = self._mrope_positions(
                input_ids, embeds, attention_mask, position_ids, past_key_values, image_grid_thw, video_grid_thw
            )
        else:
            lm_positions = position_ids
        try:
            return self.language_model(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=lm_positions,
                past_key_values=past_key_values,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        finally:
            if self._mrope is not None:
                self._mrope.positions = None
            if not torch.is_grad_enabled():
                # Nothing will recompute the layers: drop the features now rather than keep them alive.
                self._deepstack.features, self._deepstack.positions = [], None
