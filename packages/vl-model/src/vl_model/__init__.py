"""vl-model: the assembled Hugging Face-compatible Qwen3-VL-class vision-language model.

- ``VLConfig`` / ``VLTextConfig`` / ``VLVisionConfig``: configs with Qwen3-VL field names (dense or MoE).
- ``VLModel``, ``VLForConditionalGeneration``: vision tower + decoder with interleaved MRoPE and DeepStack.
- ``export_qwen3_vl``: write the official ``qwen3_vl`` / ``qwen3_vl_moe`` checkpoint layout.
- ``VLProcessor``: tokenizer + vl-vision image/video processors, Qwen3-VL chat template (thinking modes).
- ``compose`` / ``swap_language_model``: a VLM from our tower and any Hugging Face causal LM
  (``model_type="vl_composed"``); ``freeze`` / ``unfreeze`` / ``trainable_parameters`` by part.
- ``TrainableVLM``: the interface both model classes implement and all training code uses
  (``forward_hidden``, ``output_weight``, ``decoder_layers``, ``vision_tower``, ``part_modules``,
  ``moe_routing``).

``import vl_model`` registers ``model_type="vl"`` and ``"vl_composed"`` with transformers' Auto classes.
"""

from . import auto as _auto  # noqa: F401  (registration side effect)
from .checkpoint import export_qwen3_vl
from .compose import ComposedVLConfig, ComposedVLForConditionalGeneration, compose, swap_language_model
from .configuration import VLConfig, VLTextConfig, VLVisionConfig
from .modeling import VLForConditionalGeneration, VLModel, VLPreTrainedModel
from .parts import PARTS, freeze, part_parameters, trainable_parameters, unfreeze
from .processing import VLProcessor
from .runtime import HiddenStates, MoERouting, TrainableVLM
from .text import VLTextModel

__version__ = "0.2.0"

__all__ = [
    "PARTS",
    "ComposedVLConfig",
    "ComposedVLForConditionalGeneration",
    "HiddenStates",
    "MoERouting",
    "TrainableVLM",
    "VLConfig",
    "VLForConditionalGeneration",
    "VLModel",
    "VLPreTrainedModel",
    "VLProcessor",
    "VLTextConfig",
    "VLTextModel",
    "VLVisionConfig",
    "__version__",
    "compose",
    "export_qwen3_vl",
    "freeze",
    "part_parameters",
    "swap_language_model",
    "trainable_parameters",
    "unfreeze",
]
