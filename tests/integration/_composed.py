"""A tiny core model and its composed twin (our tower + transformers' Qwen3 LM with MRoPE): the same network.

The twin's weights are the core model's, renamed (``model.visual.*`` -> ``visual.*``,
``model.language_model.*`` -> ``language_model.model.*``, ``lm_head`` -> ``language_model.lm_head``), so
both must give the same losses through every trainer.
"""

from __future__ import annotations

from typing import Any

import torch
from _trainer_helpers import IMAGE, VIDEO, VISION_END, VISION_START, tiny_model
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from vl_model import compose

TOKEN_IDS = {
    "image_token_id": IMAGE,
    "video_token_id": VIDEO,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
}


def _lm_config(family: str, text: Any) -> Any:
    common: dict[str, Any] = {
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "tie_word_embeddings": False,
    }
    if family == "qwen3":
        return Qwen3Config(head_dim=text.head_dim, **common)
    if family == "llama":
        return LlamaConfig(head_dim=text.head_dim, **common)
    return Qwen2Config(**common)


def composed_twin(core: Any) -> Any:
    """The composed Qwen3 + MRoPE model with ``core``'s weights (the same network)."""
    text = core.config.text_config
    ids = {name: getattr(core.config, name) for name in TOKEN_IDS}
    model = compose(
        core.model.visual.config,
        _lm_config("qwen3", text),
        position_style="mrope",
        mrope_section=list(text.rope_parameters["mrope_section"]),
        **ids,
    )
    renamed = {}
    for key, value in core.state_dict().items():
        if key.startswith("model.visual."):
            renamed[key.removeprefix("model.")] = value
        elif key.startswith("model.language_model."):
            renamed["language_model.model." + key.removeprefix("model.language_model.")] = value
        else:
            renamed["language_model." + key] = value
    model.load_state_dict(renamed, strict=True)
    return model


def core_and_twin(seed: int = 0) -> tuple[Any, Any]:
    """``(core, composed twin)`` with the same weights."""
    core = tiny_model(seed)
    return core, composed_twin(core)


def composed(family: str, seed: int = 0) -> Any:
    """A random composed model of one LM family at the core tiny model's sizes (1-D positions for Llama/Qwen2)."""
    core = tiny_model(seed)
    text = core.config.text_config
    torch.manual_seed(seed)
    style = "mrope" if family == "qwen3" else "1d"
    extra = {"mrope_section": list(text.rope_parameters["mrope_section"])} if style == "mrope" else {}
    return compose(core.model.visual.config, _lm_config(family, text), position_style=style, **extra, **TOKEN_IDS)
