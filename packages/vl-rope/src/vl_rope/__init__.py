"""vl-rope: rotary position encodings of the Qwen3-VL family, installable alone.

- ``RoPE``: 1-D rotary with ``default``, ``linear``, ``dynamic`` (NTK) and ``yarn`` scaling.
- ``MRoPE``: multimodal rotary, interleaved (Qwen3-VL) or chunked (Qwen2/2.5-VL), with YaRN.
- ``GLM3DRoPE``: GLM-4.1V/4.5V 3D-RoPE (contiguous sections, GPT-J pairs, partial rotary).
- ``VisionRoPE2D``: the ViT's 2-D axial rotary in merge-block order.
- ``apply_rotary``: rotate q and k (torch); ``apply_rotary_fused``: the same as a Triton kernel.
- ``get_rope_index``: (T, H, W) position ids for multimodal rows, vectorised; packed and decode variants.
"""

from .apply import RotaryStyle, apply_rotary, rotate_half, rotate_pairs
from .mrope import GLM3DRoPE, MRoPE, mrope_axis_of_frequency
from .position_ids import (
    Style,
    VisionAdvance,
    decode_position_ids,
    get_packed_rope_index,
    get_rope_index,
)
from .rope import RoPE, rotary_dim
from .scaling import RopeScaling, ScalingType, default_inv_freq, rope_frequencies
from .triton_rotary import HAS_TRITON, apply_rotary_fused
from .vision import VisionRoPE2D, vision_position_ids

__version__ = "0.1.0"

__all__ = [
    "HAS_TRITON",
    "GLM3DRoPE",
    "MRoPE",
    "RoPE",
    "RopeScaling",
    "RotaryStyle",
    "ScalingType",
    "Style",
    "VisionAdvance",
    "VisionRoPE2D",
    "__version__",
    "apply_rotary",
    "apply_rotary_fused",
    "decode_position_ids",
    "default_inv_freq",
    "get_packed_rope_index",
    "get_rope_index",
    "mrope_axis_of_frequency",
    "rope_frequencies",
    "rotary_dim",
    "rotate_half",
    "rotate_pairs",
    "vision_position_ids",
]
