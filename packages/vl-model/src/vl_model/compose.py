"""Compose a VLM from parts, and swap its language model (adapter transfer).

``compose``: our vision tower (built from a ``VisionConfig``, given as a module, or initialised
from SigLIP-2 with ``vl_vision.from_siglip2``) with its merger and DeepStack mergers, and any
Hugging Face causal LM (Qwen3, Qwen2, Llama, ...) -> ``ComposedVLForConditionalGeneration``
(``model_type = "vl_composed"``, registered with AutoConfig / AutoModel /
AutoModelForImageTextToText when this module is imported).

``swap_language_model``: the adapter-transfer recipe (Skywork-R1V; REFERENCE.md section 4):
train the merger with tower and LM frozen on a plain instruct LM, then attach the same tower and
mergers to another LM of the same width (e.g. a reasoning LM); tokenizers may differ, so the
placeholder ids can be reset.

Positions: ``position_style="1d"`` (default) keeps the LM's own 1-D rotary. ``"mrope"`` gives
Qwen3-VL's interleaved MRoPE where the LM's attention allows it: rotate-half decoders with one
shared ``rotary_emb`` and the default rope type (Llama, Qwen2, Qwen3, ...); their rotary is
replaced, their weights are untouched. A Qwen3 LM composed with ``"mrope"`` computes what
transformers' Qwen3-VL computes with the same weights. Other LMs raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedModel,
)
from transformers.configuration_utils import PreTrainedConfig

from vl_vision import DeepStack, PatchMerger, VisionConfig, VisionTransformer, from_siglip2

from ._composed_config import ComposedVLConfig
from ._composed_hooks import decoder_layers
from ._composed_model import ComposedVLForConditionalGeneration

__all__ = ["ComposedVLConfig", "ComposedVLForConditionalGeneration", "compose", "swap_language_model"]


def _register() -> None:
    """Register ``vl_composed`` with the Auto classes; a second registration is a no-op."""
    AutoConfig.register(ComposedVLConfig.model_type, ComposedVLConfig, exist_ok=True)
    for auto in (AutoModel, AutoModelForImageTextToText):
        auto.register(ComposedVLConfig, ComposedVLForConditionalGeneration, exist_ok=True)


_register()


def _build_language_model(source: Any) -> PreTrainedModel:
    """A causal LM from a model, a config (object or dict with ``model_type``) or a local directory."""
    if isinstance(source, PreTrainedModel):
        return source
    if isinstance(source, PreTrainedConfig):
        return AutoModelForCausalLM.from_config(source)
    if isinstance(source, Mapping):
        data = dict(source)
        if "model_type" not in data:
            raise ValueError("a language-model config dict needs a 'model_type' (e.g. 'qwen3', 'llama')")
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**data))
    if isinstance(source, str | os.PathLike):
        if not os.path.isdir(source):
            raise ValueError(f"language_model {str(source)!r} is not a local directory (compose never downloads)")
        return AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
    raise TypeError(
        "language_model must be a PreTrainedModel, a config (object or dict) or a local directory, "
        f"got {type(source).__name__}"
    )


def _embedding_shape(lm: PreTrainedModel) -> tuple[int, int]:
    """``(vocabulary, hidden size)`` of the LM's input embeddings."""
    weight = lm.get_input_embeddings().weight
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise TypeError(f"{type(lm).__name__}'s input embeddings have no [vocab, hidden] weight")
    return int(weight.shape[0]), int(weight.shape[1])


def _is_siglip2(source: Any) -> bool:
    if isinstance(source, str | os.PathLike):
        return True
    if isinstance(source, tuple):
        return len(source) == 2
    model_type = str(getattr(getattr(source, "config", None), "model_type", ""))
    return model_type.startswith("siglip")


def _new_heads(tower: VisionTransformer, width: int) -> None:
    """Replace the merger and DeepStack mergers with fresh ones of output width ``width``."""
    cfg = tower.config
    if cfg.merger != "qwen":
        raise ValueError(f"new_merger=True supports the 'qwen' merger only, this tower has merger={cfg.merger!r}")
    param = tower.patch_embed.proj.weight
    cfg.out_hidden_size = width
    tower.merger = PatchMerger(cfg.hidden_size, width, cfg.spatial_merge_size)
    tower.deepstack_merger_list = DeepStack(
        cfg.deepstack_visual_indexes, cfg.hidden_size, width, cfg.spatial_merge_size
    )
    for module in (tower.merger, tower.deepstack_merger_list):
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                torch.nn.init.normal_(sub.weight, std=cfg.initializer_range)
                torch.nn.init.zeros_(sub.bias)
        module.to(device=param.device, dtype=param.dtype)


def _build_tower(source: Any, width: int, new_merger: bool, overrides: Mapping[str, Any]) -> VisionTransformer:
    if isinstance(source, VisionTransformer):
        if overrides:
            raise ValueError(f"vision overrides {sorted(overrides)} apply only to configs and SigLIP-2 sources")
        tower = source
    elif isinstance(source, VisionConfig | Mapping):
        cfg = source if isinstance(source, VisionConfig) else VisionConfig.from_dict(source)
        # A fresh tower: its merger is simply built at the LM's width.
        tower = VisionTransformer(dataclasses.replace(cfg, **{"out_hidden_size": width, **overrides}))
    elif _is_siglip2(source):
        tower = from_siglip2(source, **{"out_hidden_size": width, **overrides})
    else:
        raise TypeError(
            "vision must be a VisionTransformer, a VisionConfig (or dict), or a SigLIP-2 source "
            f"(directory, transformers Siglip2 model, (state_dict, config)), got {type(source).__name__}"
        )
    out = tower.config.out_hidden_size
    if out != width:
        if not new_merger:
            raise ValueError(
                f"the vision merger outputs width {out} but the language model's hidden size is {width}; "
                "pass new_merger=True to replace the merger and DeepStack mergers with fresh ones of width "
                f"{width} (they then need training)"
            )
        _new_heads(tower, width)
    return tower


def _check_token_ids(ids: Mapping[str, int], vocab: int) -> None:
    bad = {k: v for k, v in ids.items() if not 0 <= v < vocab}
    if bad:
        raise ValueError(f"token ids {bad} are outside the language model's vocabulary of {vocab} entries")


def compose(
    vision: Any,
    language_model: Any,
    *,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    vision_start_token_id: int = 151652,
    vision_end_token_id: int = 151653,
    position_style: str = "1d",
    mrope_section: list[int] | None = None,
    new_merger: bool = False,
    **vision_overrides: Any,
) -> ComposedVLForConditionalGeneration:
    """A VLM from a vision tower and a Hugging Face causal LM.

    Args:
        vision: A ``VisionTransformer`` (used as is, trained weights kept), a ``VisionConfig`` or
            its dict (a fresh tower whose ``out_hidden_size`` is set to the LM width), or a
            SigLIP-2 source for ``vl_vision.from_siglip2`` (local directory, transformers
            ``Siglip2VisionModel``/``Siglip2Model``, or ``(state_dict, config)``): blocks from
            SigLIP-2, merger and DeepStack mergers fresh at the LM width.
        language_model: A ``PreTrainedModel`` causal LM, its config (object, or dict with
            ``model_type``), or a local directory (never downloaded).
        image_token_id: Placeholder id of one merged image token (must be in the LM vocabulary).
        video_token_id: Placeholder id of one merged video token.
        vision_start_token_id: Id opening a vision run.
        vision_end_token_id: Id closing a vision run.
        position_style: ``"1d"`` (the LM's rotary) or ``"mrope"`` (see the module docstring).
        mrope_section: ``(t, h, w)`` frequencies for ``"mrope"``, summing to ``head_dim / 2``
            (``None``: Qwen3-VL's ``[24, 20, 20]`` proportions).
        new_merger: When a given tower's merger width differs from the LM's hidden size, replace
            the merger and DeepStack mergers with fresh ones of the right width; without it a
            width mismatch raises ``ValueError``.
        **vision_overrides: ``VisionConfig`` fields for config and SigLIP-2 sources
            (e.g. ``deepstack_visual_indexes``, ``depth``).

    Returns:
        The composed model (train mode as built; call ``.eval()`` for inference).

    Raises:
        ValueError: width mismatch without ``new_merger``, more DeepStack mergers than LM layers,
            token ids outside the vocabulary, ``"mrope"`` with an LM that does not allow it.
    """
    lm = _build_language_model(language_model)
    vocab, width = _embedding_shape(lm)
    ids = {
        "image_token_id": image_token_id,
        "video_token_id": video_token_id,
        "vision_start_token_id": vision_start_token_id,
        "vision_end_token_id": vision_end_token_id,
    }
    _check_token_ids(ids, vocab)
    tower = _build_tower(vision, width, new_merger, vision_overrides)
    n_deepstack, n_layers = len(tower.deepstack_merger_list), len(decoder_layers(lm))
    if n_deepstack > n_layers:
        raise ValueError(f"{n_deepstack} DeepStack mergers but the language model has only {n_layers} layers")
    config = ComposedVLConfig(
        vision_config=tower.config.to_dict(),
        text_config=lm.config,
        position_style=position_style,
        mrope_section=mrope_section,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id,
        vision_end_token_id=vision_end_token_id,
    )
    return ComposedVLForConditionalGeneration(config, visual=tower, language_model=lm)


def swap_language_model(
    model: ComposedVLForConditionalGeneration,
    new_lm: Any,
    *,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    vision_start_token_id: int | None = None,
    vision_end_token_id: int | None = None,
) -> ComposedVLForConditionalGeneration:
    """Replace the LM, keeping the (trained) tower, merger and DeepStack mergers.

    The adapter-transfer recipe (REFERENCE.md section 4): the new LM must have the same hidden
    size as the merger output. Its tokenizer may differ: pass the new placeholder ids.

    Args:
        model: A composed model (changed in place).
        new_lm: A causal LM, its config, or a local directory (as in ``compose``).
        image_token_id: New image placeholder id (``None`` keeps the current one).
        video_token_id: New video placeholder id.
        vision_start_token_id: New vision-start id.
        vision_end_token_id: New vision-end id.

    Returns:
        ``model``, with ``language_model`` and ``config.text_config`` replaced.

    Raises:
        ValueError: different hidden size (both named), ids outside the new vocabulary, too few
            layers for the DeepStack mergers.
    """
    if not isinstance(model, ComposedVLForConditionalGeneration):
        raise TypeError(f"swap_language_model needs a ComposedVLForConditionalGeneration, got {type(model).__name__}")
    lm = _build_language_model(new_lm)
    (vocab, width), merger_width = _embedding_shape(lm), model.visual.config.out_hidden_size
    if width != merger_width:
        raise ValueError(
            f"the new language model has hidden size {width} but the merger outputs width {merger_width}: "
            "adapter transfer needs an LM of the same width"
        )
    ids = {
        "image_token_id": model.config.image_token_id if image_token_id is None else image_token_id,
        "video_token_id": model.config.video_token_id if video_token_id is None else video_token_id,
        "vision_start_token_id": (
            model.config.vision_start_token_id if vision_start_token_id is None else vision_start_token_id
        ),
        "vision_end_token_id": model.config.vision_end_token_id if vision_end_token_id is None else vision_end_token_id,
    }
    _check_token_ids(ids, vocab)
    model.attach_language_model(lm)
    for key, value in ids.items():
        setattr(model.config, key, value)
    return model
