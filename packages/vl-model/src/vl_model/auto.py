"""Registration of ``model_type="vl"`` with transformers' Auto classes (run on ``import vl_model``).

After ``import vl_model``, ``AutoConfig``, ``AutoModel``, ``AutoModelForImageTextToText`` and ``AutoProcessor`` resolve
``config.json`` files with ``model_type`` ``"vl"`` (and the sub-config types ``"vl_text"``,
``"vl_vision"``) to our classes; nothing runs remote code.

Official Qwen3-VL processors without torchvision: transformers' ``Qwen3VLProcessor`` needs torchvision (its
video processor), so ``AutoProcessor.from_pretrained`` of an official checkpoint fails without it. When
torchvision is not installed, ``import vl_model`` routes the class name ``Qwen3VLProcessor`` that
``AutoProcessor`` reads from the checkpoint's files to :class:`~vl_model.VLProcessor`, which gives the same
token layout and pixels (parity-tested) without torchvision. With torchvision installed nothing is rerouted.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration import VLConfig, VLTextConfig, VLVisionConfig
from .modeling import VLForConditionalGeneration, VLModel
from .processing import VLProcessor
from .text import VLTextModel

__all__ = ["register", "route_official_processor"]

_ROUTED = ("Qwen3VLProcessor",)


def register() -> None:
    """Register our configs and models with the Auto classes (idempotent)."""
    for config in (VLConfig, VLTextConfig, VLVisionConfig):
        AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(VLConfig, VLModel, exist_ok=True)
    AutoModel.register(VLTextConfig, VLTextModel, exist_ok=True)
    AutoModelForImageTextToText.register(VLConfig, VLForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(VLConfig, VLProcessor, exist_ok=True)
    route_official_processor()


def route_official_processor() -> bool:
    """Without torchvision, let ``AutoProcessor`` build a ``VLProcessor`` for official Qwen3-VL folders.

    Returns:
        Whether the routing is active (False when torchvision is installed: transformers' own class works).
    """
    if importlib.util.find_spec("torchvision") is not None:
        return False
    from transformers.models.auto import processing_auto

    original: Any = processing_auto.processor_class_from_name
    if getattr(original, "_vl_routed", False):
        return True

    def processor_class_from_name(class_name: str) -> Any:
        return VLProcessor if class_name in _ROUTED else original(class_name)

    processor_class_from_name._vl_routed = True  # type: ignore[attr-defined]
    processing_auto.processor_class_from_name = processor_class_from_name
    return True


register()
