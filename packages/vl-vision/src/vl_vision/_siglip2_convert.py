"""Reading SigLIP-2 vision checkpoints and initialising our tower from them.

SigLIP 2 (arXiv 2502.14786) is the encoder Qwen3-VL starts from (arXiv 2511.21631 section 2).
This module reads a transformers ``Siglip2VisionModel`` (or the vision half of a ``Siglip2Model``)
from a directory, an in-memory model or a ``(state_dict, config)`` pair, without importing
transformers, and maps it onto ``VisionTransformer`` (``from_siglip2``):

- ``layer_norm1/2 -> norm1/2``, ``q/k/v_proj -> attn.qkv`` (concatenated in q, k, v order),
  ``out_proj -> attn.proj``, ``mlp.fc1/fc2 -> mlp.linear_fc1/linear_fc2``;
- the patch Linear over channel-last patches ``[D, P*P*C]`` becomes the conv kernel
  ``[D, C, T, P, P]`` with every temporal slice ``W / T``: an image repeated ``T`` times (what
  the processor does for stills) gets exactly SigLIP's patch embedding;
- the ``s x s`` position table is resampled to the target side with SigLIP's own resampling
  (bilinear, half-pixel centres, antialias);
- the merger and DeepStack mergers keep their fresh init (reported as missing keys).

Notation: ``D`` width, ``P`` patch side, ``C`` channels, ``T`` temporal patch, ``s``/``S`` table sides.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F

from .config import VisionConfig
from .tower import VisionTransformer

__all__ = ["Siglip2EncoderConfig", "from_siglip2", "load_siglip2", "resample_position_table"]

logger = logging.getLogger(__name__)

_PATCH_KEY = "embeddings.patch_embedding.weight"
_VISION_TYPES = ("siglip2_vision_model", "siglip2")


@dataclass(kw_only=True)
class Siglip2EncoderConfig:
    """Hyper-parameters of a SigLIP-2 vision encoder (transformers' ``Siglip2VisionConfig`` names).

    Attributes:
        hidden_size: Width ``D``.
        intermediate_size: Hidden width of the block MLP.
        num_hidden_layers: Number of blocks.
        num_attention_heads: Attention heads.
        num_channels: Image channels ``C``.
        patch_size: Patch side ``P``.
        num_patches: Entries of the square position table (``s * s``).
        hidden_act: MLP activation name.
        layer_norm_eps: Epsilon of every LayerNorm.
        vision_use_head: Whether the multi-head attention pooling (MAP) head exists.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    num_patches: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    def __post_init__(self) -> None:
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            raise ValueError(f"num_patches = {self.num_patches} must be a square (side x side position table)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size = {self.hidden_size} is not divisible by num_attention_heads = {self.num_attention_heads}"
            )

    @property
    def position_side(self) -> int:
        """Side ``s`` of the square position table."""
        return math.isqrt(self.num_patches)

    @classmethod
    def from_hf(cls, config_or_dict: Any) -> Siglip2EncoderConfig:
        """From a ``Siglip2VisionConfig`` / ``Siglip2Config`` (object or dict); other keys are ignored.

        Raises:
            ValueError: a ``model_type`` other than SigLIP-2's, or a missing vision config.
        """
        data = vision_config_dict(config_or_dict)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _as_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"a config must be a dict or have to_dict(), got {type(config).__name__}")


def vision_config_dict(config: Any) -> dict[str, Any]:
    """The vision config of a SigLIP-2 config (vision model or full dual encoder) as a dict."""
    data = _as_dict(config)
    model_type = data.get("model_type")
    if model_type == "siglip2":
        if data.get("vision_config") is None:
            raise ValueError("a 'siglip2' config without 'vision_config': cannot find the vision encoder")
        data = _as_dict(data["vision_config"])
        model_type = data.get("model_type", "siglip2_vision_model")
    if model_type not in _VISION_TYPES:
        hint = " (SigLIP 1 has a conv patch embedding and no resizable table)" if "siglip" in str(model_type) else ""
        raise ValueError(
            f"expected a SigLIP-2 checkpoint (model_type 'siglip2_vision_model' or 'siglip2'), "
            f"got model_type {model_type!r}{hint}"
        )
    return data


def _read_directory(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory holding config.json and *.safetensors")
    config_file = path / "config.json"
    files = sorted(path.glob("*.safetensors"))
    if not config_file.is_file() or not files:
        raise FileNotFoundError(f"{path} must hold config.json and *.safetensors weights (found {os.listdir(path)})")
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # an optional dependency: the package itself needs only torch
        raise ImportError("loading a SigLIP-2 checkpoint directory needs safetensors: pip install safetensors") from e
    state: dict[str, torch.Tensor] = {}
    for file in files:  # one file or the shards of a sharded checkpoint
        state.update(load_file(str(file)))
    return state, json.loads(config_file.read_text())


def load_siglip2(source: Any) -> tuple[dict[str, torch.Tensor], Siglip2EncoderConfig]:
    """Vision weights (keys without any ``vision_model.`` prefix) and config of a SigLIP-2 checkpoint.

    Args:
        source: A directory with ``config.json`` + ``*.safetensors``; a transformers model (anything
            with ``state_dict()`` and ``config``); or a ``(state_dict, config)`` pair, the config a
            dict or config object. Full ``Siglip2Model`` checkpoints give their vision half.

    Raises:
        ValueError: not a SigLIP-2 checkpoint, or weights that contradict the config.
        TypeError: an unsupported ``source``.
        ImportError: a directory but ``safetensors`` is not installed.
    """
    if isinstance(source, str | os.PathLike):
        raw_state, raw_config = _read_directory(Path(source))
    elif isinstance(source, tuple) and len(source) == 2:
        raw_state, raw_config = dict(source[0]), source[1]
    elif hasattr(source, "state_dict") and hasattr(source, "config"):
        raw_state, raw_config = source.state_dict(), source.config
    else:
        raise TypeError(
            "source must be a checkpoint directory, a transformers Siglip2 model or a (state_dict, config) pair, "
            f"got {type(source).__name__}"
        )
    config = Siglip2EncoderConfig.from_hf(raw_config)
    prefixes = [k[: -len(_PATCH_KEY)] for k in raw_state if k.endswith(_PATCH_KEY)]
    if len(prefixes) != 1:
        raise ValueError(
            f"expected one '{_PATCH_KEY}' in the state dict, found {len(prefixes)}: not a SigLIP-2 vision checkpoint"
        )
    prefix = prefixes[0]
    state = {k[len(prefix) :]: v.detach() for k, v in raw_state.items() if k.startswith(prefix)}
    _check_shapes(state, config)
    return state, config


def _check_shapes(state: Mapping[str, torch.Tensor], config: Siglip2EncoderConfig) -> None:
    d, c, p = config.hidden_size, config.num_channels, config.patch_size
    patch = state[_PATCH_KEY]
    if tuple(patch.shape) != (d, p * p * c):
        raise ValueError(
            f"patch embedding weight has shape {tuple(patch.shape)} but the config implies a Linear "
            f"[hidden_size, patch_size^2 * num_channels] = [{d}, {p}^2 * {c}] (patch size mismatch?)"
        )
    table = state.get("embeddings.position_embedding.weight")
    if table is None or tuple(table.shape) != (config.num_patches, d):
        shape = None if table is None else tuple(table.shape)
        raise ValueError(f"position table has shape {shape}, the config implies [{config.num_patches}, {d}]")
    for i in range(config.num_hidden_layers):
        if f"encoder.layers.{i}.self_attn.q_proj.weight" not in state:
            raise ValueError(f"the config has {config.num_hidden_layers} layers but layer {i} has no weights")


def resample_position_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """Resample a square table ``[s*s, D]`` to ``[side*side, D]`` as SigLIP-2 resizes it per image.

    Bilinear, half-pixel centres, antialias (``F.interpolate``), in float32 (float64 kept); the
    same side returns a copy of the table.
    """
    s = math.isqrt(table.shape[0])
    if s * s != table.shape[0]:
        raise ValueError(f"the position table has {table.shape[0]} rows, not a square number")
    if s == side:
        return table.clone()
    acc = torch.float64 if table.dtype == torch.float64 else torch.float32
    grid = table.to(acc).reshape(s, s, -1).permute(2, 0, 1)[None]
    out = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return out[0].reshape(table.shape[1], side * side).t().to(table.dtype)


def block_state(state: Mapping[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Our ``VisionBlock`` keys (``norm1.*``, ``attn.qkv.*`` ...) for SigLIP-2 layer ``i``."""
    src = f"encoder.layers.{i}."
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in (
        ("norm1", "layer_norm1"),
        ("norm2", "layer_norm2"),
        ("attn.proj", "self_attn.out_proj"),
        ("mlp.linear_fc1", "mlp.fc1"),
        ("mlp.linear_fc2", "mlp.fc2"),
    ):
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = state[f"{src}{theirs}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"attn.qkv.{kind}"] = torch.cat([state[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"])
    return out


def patch_kernel(weight: torch.Tensor, *, in_channels: int, patch_size: int, temporal_patch_size: int) -> torch.Tensor:
    """SigLIP's patch Linear ``[D, P*P*C]`` (channel-last rows) as a conv kernel ``[D, C, T, P, P]``.

    Each temporal slice is ``W / T``, so ``T`` copies of a frame sum to SigLIP's embedding.
    """
    d, p, c, t = weight.shape[0], patch_size, in_channels, temporal_patch_size
    spatial = weight.reshape(d, p, p, c).permute(0, 3, 1, 2)  # (py, px, c) -> (c, py, px)
    return (spatial[:, :, None] / t).expand(d, c, t, p, p).contiguous()


# Our fields fixed by the SigLIP-2 checkpoint (ours <- theirs).
_FROM_CHECKPOINT = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_heads": "num_attention_heads",
    "in_channels": "num_channels",
    "patch_size": "patch_size",
    "hidden_act": "hidden_act",
    "norm_eps": "layer_norm_eps",
}
# SigLIP-2 block parts: LayerNorm, GELU MLP, biases everywhere, no post-conv norm.
_BLOCK_PARTS = {
    "norm": "layernorm",
    "mlp": "gelu",
    "mlp_bias": True,
    "qkv_bias": True,
    "proj_bias": True,
    "post_conv_norm": False,
    "mlp_intermediate_size": None,
}


@overload
def from_siglip2(
    source: Any, *, dtype: torch.dtype | None = ..., output_loading_info: Literal[False] = ..., **overrides: Any
) -> VisionTransformer: ...
@overload
def from_siglip2(
    source: Any, *, dtype: torch.dtype | None = ..., output_loading_info: Literal[True], **overrides: Any
) -> tuple[VisionTransformer, dict[str, list[str]]]: ...
def from_siglip2(
    source: Any, *, dtype: torch.dtype | None = None, output_loading_info: bool = False, **overrides: Any
) -> VisionTransformer | tuple[VisionTransformer, dict[str, list[str]]]:
    """Initialise our ``VisionTransformer`` from a SigLIP-2 vision checkpoint (Qwen3-VL's starting point).

    Blocks are mapped (q/k/v fused), the patch Linear becomes the temporal kernel (a still image
    repeated ``T`` times embeds as in SigLIP), the position table is resampled to the side of
    ``num_position_embeddings``; the merger and DeepStack mergers keep their fresh init.

    Args:
        source: See ``load_siglip2`` (directory, transformers model or ``(state_dict, config)``).
        dtype: Parameter dtype; ``None`` takes the checkpoint's.
        output_loading_info: Also return ``{"missing_keys": [...], "unexpected_keys": [...]}``: our
            keys left at their init, and checkpoint keys not used (``post_layernorm``, ``head``, ...).
        **overrides: ``VisionConfig`` fields (``out_hidden_size``, ``deepstack_visual_indexes``,
            ``spatial_merge_size``, ``temporal_patch_size``, ``num_position_embeddings``, ``depth``
            up to the checkpoint's layer count, ...).

    Returns:
        The tower (and the loading info when asked).

    Raises:
        ValueError: not a SigLIP-2 checkpoint, or overrides that contradict it (``patch_size``,
            widths, norm/MLP kind, more blocks than the checkpoint has).
    """
    state, sig = load_siglip2(source)
    fields: dict[str, Any] = {ours: getattr(sig, theirs) for ours, theirs in _FROM_CHECKPOINT.items()}
    fields["depth"] = sig.num_hidden_layers
    for name, value in {**fields, **_BLOCK_PARTS}.items():
        if name in overrides and overrides[name] != value and name != "depth":
            raise ValueError(
                f"{name} = {overrides[name]!r} contradicts the SigLIP-2 checkpoint, which has {name} = {value!r}"
            )
    fields.update(overrides)
    if fields["depth"] > sig.num_hidden_layers:
        raise ValueError(f"depth = {fields['depth']} but the SigLIP-2 checkpoint has {sig.num_hidden_layers} layers")
    config = VisionConfig(**fields)
    tower = VisionTransformer(config)
    if dtype is None:
        dtype = state[_PATCH_KEY].dtype
    tower.to(dtype)
    ours: dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": patch_kernel(
            state[_PATCH_KEY],
            in_channels=config.in_channels,
            patch_size=config.patch_size,
            temporal_patch_size=config.temporal_patch_size,
        ),
        "patch_embed.proj.bias": state["embeddings.patch_embedding.bias"],
        "pos_embed.weight": resample_position_table(
            state["embeddings.position_embedding.weight"], config.position_grid_side
        ),
    }
    used = {_PATCH_KEY, "embeddings.patch_embedding.bias", "embeddings.position_embedding.weight"}
    for i in range(config.depth):
        ours.update({f"blocks.{i}.{k}": v for k, v in block_state(state, i).items()})
        used.update(k for k in state if k.startswith(f"encoder.layers.{i}."))
    result = tower.load_state_dict(ours, strict=False)
    if result.unexpected_keys:  # a mapping bug, never a checkpoint property
        raise RuntimeError(f"internal error: keys {result.unexpected_keys} do not exist in VisionTransformer")
    info = {"missing_keys": sorted(result.missing_keys), "unexpected_keys": sorted(set(state) - used)}
    logger.info(
        "from_siglip2: %d keys left at their init (%s); %d checkpoint keys unused",
        len(info["missing_keys"]),
        ", ".join(sorted({k.split(".")[0] for k in info["missing_keys"]})),
        len(info["unexpected_keys"]),
    )
    return (tower, info) if output_loading_info else tower
