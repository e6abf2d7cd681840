"""vl-vision: the Qwen3-VL-class vision encoder, installable alone.

- ``VisionConfig``: keyword-only config with transformers' ``Qwen3VLVisionConfig`` field names
  (``from_hf`` / ``to_dict``), plus the variant parts (GLM-4.5V) and runtime options.
- ``VisionTransformer``: ``(pixel_values [N, C*T*P*P], grid_thw [n, 3]) -> VisionOutput(merged, deepstack)``;
  state-dict keys equal transformers' Qwen3-VL vision tower; ``forward_intermediates``.
- ``PatchMerger``, ``DeepStack``: the 2x2 merger and the DeepStack mergers, usable on any encoder.
- ``varlen_attention`` / ``VarlenLayout``: per-image attention without padding (sdpa, eager, flash).
- ``glm4v_to_ours`` / ``ours_to_glm4v`` / ``strip_visual_prefix``: checkpoint key adapters.
- ``from_siglip2`` / ``Siglip2VisionEncoder``: start our tower from a SigLIP-2 checkpoint, or run
  SigLIP-2 exactly (its own outputs from its weights) as a part.
- ``TimmVisionTower``: any timm ViT behind the same ``(pixel_values, grid_thw)`` interface (timm extra).
- ``smart_resize``, ``ImageProcessor``, ``VideoProcessor`` (and the rest of ``vl_vision.processing``):
  torchvision-free image/video preprocessing with frame timestamps.
"""

from .attention import VarlenLayout, VisionAttention, varlen_attention
from .block import VisionBlock
from .config import AttnImplementation, VisionConfig
from .convert import glm4v_to_ours, ours_to_glm4v, strip_visual_prefix
from .glm import GLMMerger, MergeDownsample
from .layers import GeluMLP, RMSNorm, SwiGLU
from .merger import DeepStack, PatchMerger
from .patch_embed import PatchEmbed
from .position import LearnedPositionTable
from .processing import (
    ImageBatch,
    ImageProcessor,
    VideoBatch,
    VideoProcessor,
    format_timestamp,
    open_image,
    patch_times,
    sample_frame_indices,
    smart_resize,
    smart_resize_video,
    to_rgb_image,
)
from .siglip2 import (
    Siglip2EncoderConfig,
    Siglip2EncoderOutput,
    Siglip2PoolingHead,
    Siglip2VisionEncoder,
    from_siglip2,
    qwen_patches_to_siglip2,
)
from .timm_adapter import TimmVisionTower, create_timm_model
from .tower import VisionOutput, VisionTransformer, build_block

__version__ = "0.2.0"

__all__ = [
    "AttnImplementation",
    "DeepStack",
    "GLMMerger",
    "GeluMLP",
    "ImageBatch",
    "ImageProcessor",
    "LearnedPositionTable",
    "MergeDownsample",
    "PatchEmbed",
    "PatchMerger",
    "RMSNorm",
    "Siglip2EncoderConfig",
    "Siglip2EncoderOutput",
    "Siglip2PoolingHead",
    "Siglip2VisionEncoder",
    "SwiGLU",
    "TimmVisionTower",
    "VarlenLayout",
    "VideoBatch",
    "VideoProcessor",
    "VisionAttention",
    "VisionBlock",
    "VisionConfig",
    "VisionOutput",
    "VisionTransformer",
    "__version__",
    "build_block",
    "create_timm_model",
    "format_timestamp",
    "from_siglip2",
    "glm4v_to_ours",
    "open_image",
    "ours_to_glm4v",
    "patch_times",
    "qwen_patches_to_siglip2",
    "sample_frame_indices",
    "smart_resize",
    "smart_resize_video",
    "strip_visual_prefix",
    "to_rgb_image",
    "varlen_attention",
]
