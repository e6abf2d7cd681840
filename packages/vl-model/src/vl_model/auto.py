"""Registration of ``model_type="vl"`` with transformers' Auto classes (run on ``import vl_model``).

After ``import vl_model``, ``AutoConfig``, ``AutoModel``, ``AutoModelForImageTextToText`` and ``AutoProcessor`` resolve
``config.json`` files with ``model_type`` ``"vl"`` (and the sub-config types ``"vl_text"``,
``"vl_vision"``) to our classes; nothing runs remote code.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration import VLConfig, VLTextConfig, VLVisionConfig
from .modeling import VLForConditionalGeneration, VLModel
from .processing import VLProcessor
from .text import VLTextModel

__all__ = ["register"]


def register() -> None:
    """Register our configs and models with the Auto classes (idempotent)."""
    for config in (VLConfig, VLTextConfig, VLVisionConfig):
        AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(VLConfig, VLModel, exist_ok=True)
    AutoModel.register(VLTextConfig, VLTextModel, exist_ok=True)
    AutoModelForImageTextToText.register(VLConfig, VLForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(VLConfig, VLProcessor, exist_ok=True)


register()
