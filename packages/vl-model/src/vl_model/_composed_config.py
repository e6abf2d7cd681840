"""Config of a VLM composed from our vision tower and any Hugging Face causal LM.

``ComposedVLConfig`` (``model_type = "vl_composed"``): our ``vl_vision.VisionConfig`` as a dict,
the LM's own config as ``text_config`` (any ``model_type`` transformers knows, rebuilt with
``AutoConfig`` from its ``model_type``), the placeholder token ids and the position style.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from vl_vision import VisionConfig

__all__ = ["ComposedVLConfig"]

_POSITION_STYLES = ("1d", "mrope")


class ComposedVLConfig(PreTrainedConfig):
    """Config of a composed VLM (``model_type = "vl_composed"``).

    Attributes:
        vision_config: Our ``vl_vision.VisionConfig`` as a dict (``VisionConfig.to_dict()``).
        text_config: The LM's own config (any ``model_type`` transformers knows); a dict is
            rebuilt with ``AutoConfig.for_model`` from its ``model_type``.
        image_token_id: Placeholder id of one merged image token.
        video_token_id: Placeholder id of one merged video token.
        vision_start_token_id: Id that opens a vision run.
        vision_end_token_id: Id that closes a vision run.
        position_style: ``"1d"`` (the LM's rotary, one position per token) or ``"mrope"``
            (interleaved MRoPE replacing the LM's rotary; rotate-half LMs with a shared
            ``rotary_emb`` and the default rope type).
        mrope_section: Frequencies per axis ``(t, h, w)`` for ``"mrope"`` (``None``: Qwen3-VL's
            ``[24, 20, 20]`` proportions of ``head_dim / 2``).
        tie_word_embeddings: Mirrors the LM's setting (the LM ties its own weights).
    """

    model_type = "vl_composed"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3")
    }

    vision_config: dict | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    position_style: str = "1d"
    mrope_section: list[int] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        text = self.text_config
        # The base class sets its (here unset) attention backend on the sub-configs too; a given
        # LM config object keeps its own.
        keep = getattr(text, "_attn_implementation", None) if "attn_implementation" not in kwargs else None
        super().__post_init__(**kwargs)
        if keep is not None and isinstance(self.text_config, PreTrainedConfig):
            self.text_config._attn_implementation = keep
        if self.position_style not in _POSITION_STYLES:
            raise ValueError(f"position_style must be one of {_POSITION_STYLES}, got {self.position_style!r}")
        vision = self.vision_config
        if isinstance(vision, VisionConfig):
            vision = vision.to_dict()
        # Validate once here, so a bad dict fails at config time and not at model build time.
        self.vision_config = VisionConfig.from_dict(vision or {}).to_dict()
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def vision(self) -> VisionConfig:
        """``vision_config`` as a ``vl_vision.VisionConfig``."""
        return VisionConfig.from_dict(self.vision_config or {})
