"""Configuration of the vision tower: one keyword-only dataclass.

Field names are those of transformers' ``Qwen3VLVisionConfig`` (Qwen3-VL technical
report, arXiv 2511.21631, section 2 "vision encoder"), so a ``vision_config`` dict of an
official checkpoint maps one to one. The extra fields select the variant parts
(GLM-4.1V/4.5V, arXiv 2507.01006 section 2: RMSNorm, SwiGLU, bicubic position table,
conv downsample merger) and runtime options (attention backend, activation checkpointing).

Notation: ``D`` hidden size, ``P`` patch size, ``T`` temporal patch size, ``C`` channels,
``m`` spatial merge size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["AttnImplementation", "VisionConfig"]

AttnImplementation = Literal["sdpa", "flash", "eager"]

# Keys every transformers ``PreTrainedConfig.to_dict()`` carries that say nothing about the architecture.
_HF_GENERIC_KEYS = frozenset(
    {
        "transformers_version",
        "architectures",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "dtype",
        "torch_dtype",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "_name_or_path",
        "name_or_path",
        "model_type",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attention_dropout",
        "tie_word_embeddings",
        "use_return_dict",
    }
)

_CHOICES: dict[str, tuple[str, ...]] = {
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
    "position_interpolation": ("bilinear", "bicubic"),
    "merger": ("qwen", "glm"),
    "attn_implementation": ("sdpa", "flash", "eager"),
    "hidden_act": ("gelu_pytorch_tanh", "gelu", "silu", "quick_gelu", "relu"),
}


@dataclass(kw_only=True)
class VisionConfig:
    """Vision tower hyper-parameters (defaults: Qwen3-VL's SigLIP-2 SO-400M tower).

    Attributes:
        depth: Number of transformer blocks.
        hidden_size: Width ``D`` of the blocks.
        hidden_act: Activation of the block MLP (``gelu_pytorch_tanh`` = GELU, tanh approximation).
        intermediate_size: Hidden width of the block MLP (Qwen); of the SwiGLU merger (GLM).
        num_heads: Attention heads; ``D / num_heads`` must be divisible by 4 (2-D RoPE).
        in_channels: Image channels ``C``.
        patch_size: Spatial patch size ``P``.
        spatial_merge_size: ``m``; ``m x m`` neighbouring patches become one output token.
        temporal_patch_size: Frames per temporal patch ``T`` (images are repeated ``T`` times).
        out_hidden_size: Width of the output tokens (the language model's hidden size).
        num_position_embeddings: Entries of the learned square position table (48 x 48 = 2304).
        deepstack_visual_indexes: Blocks (0-based) whose outputs feed the DeepStack mergers.
        initializer_range: Std of the normal init of linear weights and the position table.
        rope_theta: Frequency base of the 2-D RoPE.
        norm: ``"layernorm"`` (Qwen) or ``"rmsnorm"`` (GLM) in the blocks.
        norm_eps: Epsilon of the block norms (1e-6 Qwen, 1e-5 GLM).
        mlp: ``"gelu"`` (fc1 -> act -> fc2, Qwen) or ``"swiglu"`` (gate/up/down, GLM) block MLP.
        mlp_intermediate_size: Hidden width of a SwiGLU block MLP (GLM uses ``out_hidden_size``);
            ``None`` means ``intermediate_size``.
        mlp_bias: Biases in the block MLP.
        qkv_bias: Bias of the fused qkv projection.
        proj_bias: Bias of the attention output projection.
        position_interpolation: ``"bilinear"`` (align corners, Qwen) or ``"bicubic"`` (half-pixel
            centres, border padding, GLM) resampling of the position table.
        post_conv_norm: RMSNorm after the patch embedding (GLM).
        merger: ``"qwen"`` (LayerNorm -> 2x2 concat -> MLP) or ``"glm"`` (RMSNorm -> 2x2 conv
            downsample -> projection + LayerNorm + GELU -> SwiGLU).
        attn_implementation: ``"sdpa"``, ``"flash"`` (flash_attn varlen) or ``"eager"``.
        gradient_checkpointing: Recompute each block in the backward pass.
    """

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    mlp: str = "gelu"
    mlp_intermediate_size: int | None = None
    mlp_bias: bool = True
    qkv_bias: bool = True
    proj_bias: bool = True
    position_interpolation: str = "bilinear"
    post_conv_norm: bool = False
    merger: str = "qwen"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.deepstack_visual_indexes = [int(i) for i in self.deepstack_visual_indexes]
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"VisionConfig.{name} must be one of {choices}, got {value!r}")
        for name in (
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "in_channels",
            "patch_size",
            "spatial_merge_size",
            "temporal_patch_size",
            "out_hidden_size",
            "num_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VisionConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size = {self.hidden_size} is not divisible by num_heads = {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(
                f"head dim = hidden_size / num_heads = {self.head_dim} must be divisible by 4 for the 2-D RoPE"
            )
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise ValueError(
                f"num_position_embeddings = {self.num_position_embeddings} must be a square (side x side table)"
            )
        for i in self.deepstack_visual_indexes:
            if not 0 <= i < self.depth:
                raise ValueError(f"deepstack_visual_indexes has {i}, outside the {self.depth} blocks [0, {self.depth})")
        if len(set(self.deepstack_visual_indexes)) != len(self.deepstack_visual_indexes):
            raise ValueError(f"deepstack_visual_indexes has duplicates: {self.deepstack_visual_indexes}")

    @property
    def head_dim(self) -> int:
        """``hidden_size / num_heads``."""
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Width of one row of ``pixel_values``: ``C * T * P * P``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def position_grid_side(self) -> int:
        """Side of the square learned position table."""
        return math.isqrt(self.num_position_embeddings)

    @property
    def block_mlp_size(self) -> int:
        """Hidden width of the block MLP."""
        return self.mlp_intermediate_size if self.mlp_intermediate_size is not None else self.intermediate_size

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain Python values (``VisionConfig(**cfg.to_dict()) == cfg``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VisionConfig:
        """Build from a dict of our field names; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VisionConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_hf(cls, config_or_dict: Any, **overrides: Any) -> VisionConfig:
        """Map a transformers vision config (object or dict) to a ``VisionConfig``.

        Accepts ``Qwen3VLVisionConfig`` / ``Qwen3VLMoeVisionConfig`` (field names shared with
        ours, ``rope_parameters["rope_theta"]`` -> ``rope_theta``) and ``Glm4vVisionConfig``
        (``model_type == "glm4v_vision"``: GLM parts switched on, ``image_size / patch_size``
        squared position entries, ``rms_norm_eps``, ``attention_bias``). Generic
        ``PreTrainedConfig`` keys are ignored; any other unknown key raises ``ValueError``.

        Args:
            config_or_dict: A transformers config object (anything with ``to_dict()``) or a dict.
            **overrides: Our fields to set on top (e.g. ``attn_implementation="eager"``).
        """
        data = dict(config_or_dict.to_dict() if hasattr(config_or_dict, "to_dict") else config_or_dict)
        model_type = str(data.get("model_type", ""))
        out: dict[str, Any] = {}
        rope = data.pop("rope_parameters", None) or {}
        if "rope_theta" in rope:
            out["rope_theta"] = float(rope["rope_theta"])
        if "rope_theta" in data:
            out["rope_theta"] = float(data.pop("rope_theta"))
        if model_type.startswith("glm4v"):
            image_size = _square(data.pop("image_size"), "image_size")
            patch = _square(data["patch_size"], "patch_size")
            out.update(
                norm="rmsnorm",
                norm_eps=float(data.pop("rms_norm_eps", 1e-5)),
                mlp="swiglu",
                mlp_intermediate_size=data["out_hidden_size"],
                mlp_bias=False,
                qkv_bias=bool(data.pop("attention_bias", False)),
                proj_bias=False,
                position_interpolation="bicubic",
                post_conv_norm=True,
                merger="glm",
                num_position_embeddings=(image_size // patch) ** 2,
                deepstack_visual_indexes=[],
            )
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key in known:
                out.setdefault(key, value)
            elif key not in _HF_GENERIC_KEYS:
                raise ValueError(
                    f"unknown vision config field {key!r} (= {value!r}) in a {model_type or 'transformers'} config; "
                    f"VisionConfig knows {sorted(known)}"
                )
        for key in ("patch_size", "temporal_patch_size"):
            if key in out:
                out[key] = _square(out[key], key)
        out.update(overrides)
        return cls.from_dict(out)


def _square(value: Any, name: str) -> Any:
    """One size from an int or an ``[a, a, ...]`` list (transformers allows either); unequal sizes raise."""
    if not isinstance(value, list | tuple):
        return value
    sizes = set(value)
    if len(sizes) != 1:
        raise ValueError(f"{name} = {list(value)}: only square patches and tables are supported")
    return sizes.pop()
