"""The vision tower: a native-resolution ViT with 2-D RoPE, varlen attention, merger and DeepStack.

Implements the Qwen3-VL vision encoder (arXiv 2511.21631 section 2): patch embedding of
``T x P x P`` patches, a learned absolute position table resampled per image, 2-D axial RoPE
(from ``vl_rope``), pre-norm blocks whose attention stays inside each image / temporal patch,
the 2x2 patch merger, and DeepStack taps with their own mergers. The GLM-4.1V/4.5V tower
(arXiv 2507.01006 section 2) is the same class with other parts, selected by ``VisionConfig``.

State-dict keys equal transformers' ``Qwen3VLVisionModel`` (``model.visual.*`` without the
prefix), so its weights load strictly; GLM weights load after ``convert.glm4v_to_ours``.

Notation: ``N`` patches, ``n`` images/videos, ``D`` width, ``E`` output width, ``m`` merge size.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vl_rope import VisionRoPE2D

from ._checks import check_inputs
from .attention import VarlenLayout, VisionAttention, expand_rope
from .block import VisionBlock
from .config import VisionConfig
from .glm import GLMMerger, MergeDownsample
from .layers import GeluMLP, RMSNorm, SwiGLU, make_norm
from .merger import DeepStack, PatchMerger
from .patch_embed import PatchEmbed
from .position import LearnedPositionTable

__all__ = ["VisionOutput", "VisionTransformer", "build_block"]


@dataclass
class VisionOutput:
    """What the tower returns.

    Attributes:
        merged: ``[N / m^2, E]`` merged tokens (what replaces the image placeholders).
        deepstack: One ``[N / m^2, E]`` tensor per DeepStack tap, in ``deepstack_visual_indexes`` order.
        last_hidden_state: ``[N, D]`` block output before the merge head.
    """

    merged: torch.Tensor
    deepstack: list[torch.Tensor] = field(default_factory=list)
    last_hidden_state: torch.Tensor | None = None


def build_block(config: VisionConfig) -> VisionBlock:
    """One block with the parts ``config`` selects (LayerNorm/RMSNorm, GELU MLP/SwiGLU)."""
    d = config.hidden_size
    if config.mlp == "gelu":
        mlp: nn.Module = GeluMLP(d, config.block_mlp_size, config.hidden_act, bias=config.mlp_bias)
    else:
        mlp = SwiGLU(d, config.block_mlp_size, config.hidden_act, bias=config.mlp_bias)
    attn = VisionAttention(
        d, config.num_heads, qkv_bias=config.qkv_bias, proj_bias=config.proj_bias, backend=config.attn_implementation
    )
    norm = lambda: make_norm(config.norm, d, config.norm_eps)
    return VisionBlock(norm(), attn, norm(), mlp)


def _check_backend(name: str) -> None:
    if name not in ("sdpa", "eager", "flash"):
        raise ValueError(f"attn_implementation must be 'sdpa', 'eager' or 'flash', got {name!r}")
    if name == "flash" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError("attn_implementation='flash' needs flash-attn: pip install 'vl-vision[flash]'")


class VisionTransformer(nn.Module):
    """The vision encoder: ``(pixel_values [N, C*T*P*P], grid_thw [n, 3]) -> VisionOutput``.

    Args:
        config: Hyper-parameters and variant parts (see ``VisionConfig``).

    Example:
        >>> cfg = VisionConfig(
        ...     depth=2,
        ...     hidden_size=32,
        ...     num_heads=2,
        ...     intermediate_size=64,
        ...     out_hidden_size=48,
        ...     deepstack_visual_indexes=[0],
        ...     patch_size=4,
        ... )
        >>> tower = VisionTransformer(cfg)
        >>> grid = torch.tensor([[1, 4, 6]])
        >>> out = tower(torch.randn(24, cfg.patch_dim), grid)
        >>> out.merged.shape, out.deepstack[0].shape
        (torch.Size([6, 48]), torch.Size([6, 48]))
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        _check_backend(config.attn_implementation)
        self.config = config
        d, m = config.hidden_size, config.spatial_merge_size
        self.spatial_merge_size = m
        self.gradient_checkpointing = config.gradient_checkpointing
        self.patch_embed = PatchEmbed(config.in_channels, d, config.patch_size, config.temporal_patch_size)
        self.post_conv_layernorm = RMSNorm(d, config.norm_eps) if config.post_conv_norm else None
        self.pos_embed = LearnedPositionTable(
            config.num_position_embeddings, d, mode=config.position_interpolation, spatial_merge_size=m
        )
        # Kept out of the module tree: ``tower.to(torch.bfloat16)`` must not cast the float32
        # frequencies (the references compute the rotary angles in float32 in every dtype).
        # Built on CPU even under a ``torch.device("meta")`` context (transformers' ``from_pretrained``):
        # the table is not a parameter or buffer, so no checkpoint load would ever fill it in.
        with torch.device("cpu"):
            self._rope = (VisionRoPE2D(config.head_dim, config.rope_theta, m),)
        self.blocks = nn.ModuleList(build_block(config) for _ in range(config.depth))
        self.post_layernorm: nn.Module | None = None
        self.downsample: MergeDownsample | None = None
        self.merger: nn.Module
        if config.merger == "qwen":
            self.merger = PatchMerger(d, config.out_hidden_size, m)
        else:
            self.post_layernorm = RMSNorm(d, config.norm_eps)
            self.downsample = MergeDownsample(d, config.out_hidden_size, m)
            self.merger = GLMMerger(config.out_hidden_size, config.intermediate_size, config.hidden_act)
        self.deepstack_merger_list = DeepStack(config.deepstack_visual_indexes, d, config.out_hidden_size, m)
        self.reset_parameters()

    # ------------------------------------------------------------------ set-up

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, ``initializer_range``) linear weights and position table, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm | RMSNorm):
                nn.init.ones_(module.weight)
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor):
                    nn.init.zeros_(bias)
        nn.init.normal_(self.pos_embed.weight, std=std)

    def set_attn_implementation(self, name: str) -> None:
        """Switch every block's attention backend (``"sdpa"``, ``"eager"``, ``"flash"``)."""
        _check_backend(name)
        self.config.attn_implementation = name
        for block in self.blocks:
            block.attn.backend = name  # type: ignore[union-attr]

    def rotary(self, device: torch.device) -> VisionRoPE2D:
        """The 2-D RoPE (float32 frequencies), moved to ``device`` if needed."""
        rope = self._rope[0]
        if rope.inv_freq.device != device:
            rope.to(device)
        return rope

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters."""
        return self.patch_embed.proj.weight.dtype

    # ------------------------------------------------------------------ pieces

    def embed(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], VarlenLayout]:
        """Check inputs; patch + position embedding ``[N, D]``, RoPE ``(cos, sin)`` and attention layout."""
        cfg = self.config
        grid = check_inputs(
            pixel_values,
            grid_thw,
            in_channels=cfg.in_channels,
            temporal_patch_size=cfg.temporal_patch_size,
            patch_size=cfg.patch_size,
            spatial_merge_size=cfg.spatial_merge_size,
        )
        x = self.patch_embed(pixel_values)
        if self.post_conv_layernorm is not None:
            x = self.post_conv_layernorm(x)
        x = x + self.pos_embed(grid).to(x.dtype)
        rope = self.rotary(x.device)(grid)
        return x, rope, VarlenLayout.from_grid(grid, x.device)

    def _run_block(
        self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: VarlenLayout
    ) -> torch.Tensor:
        block = self.blocks[i]
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, rope, layout, use_reentrant=False)
        return block(x, rope, layout)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """The merge head: ``[N, D] -> [N / m^2, E]``."""
        if self.downsample is not None:
            assert self.post_layernorm is not None
            x = self.downsample(self.post_layernorm(x))
        return self.merger(x)

    # ------------------------------------------------------------------ forward

    def _grouped(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], VarlenLayout, torch.Tensor | None]:
        """``embed``, then reorder the tokens once so that equal-length segments are contiguous.

        Every op but attention is per token, and attention is per segment, so the blocks run in
        that order with zero-copy attention batches; outputs are put back with ``_restore``.
        """
        x, rope, layout = self.embed(pixel_values, grid_thw)
        perm = layout.perm
        if perm is not None:
            x, rope, layout = x[perm], (rope[0][perm], rope[1][perm]), layout.grouped()
        return x, expand_rope(*rope, self.config.num_heads), layout, perm

    @staticmethod
    def _restore(x: torch.Tensor, perm: torch.Tensor | None, unit: int = 1) -> torch.Tensor:
        """Undo the token reordering on ``[N / unit, ...]`` rows (``unit = m^2`` for merged tokens)."""
        if perm is None:
            return x
        rows = perm[::unit] // unit if unit > 1 else perm
        return torch.empty_like(x).index_copy(0, rows, x)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionOutput:
        """Encode the patches of ``n`` images/videos.

        Args:
            pixel_values: ``[N, C*T*P*P]`` patches in the processor's merge-block order.
            grid_thw: ``[n, 3]`` patch grid ``(t, h, w)`` of each image/video, ``h, w`` divisible by ``m``.

        Returns:
            ``VisionOutput(merged [N/m^2, E], deepstack [[N/m^2, E], ...], last_hidden_state [N, D])``.
        """
        x, rope, layout, perm = self._grouped(pixel_values, grid_thw)
        taps: dict[int, torch.Tensor] = {}
        wanted = set(self.deepstack_merger_list.layer_indexes)
        for i in range(len(self.blocks)):
            x = self._run_block(i, x, rope, layout)
            if i in wanted:
                taps[i] = x
        unit = self.spatial_merge_size**2
        deepstack = [self._restore(f, perm, unit) for f in self.deepstack_merger_list(taps)] if wanted else []
        merged = self._restore(self.merge(x), perm, unit)
        return VisionOutput(merged=merged, deepstack=deepstack, last_hidden_state=self._restore(x, perm))

    def forward_intermediates(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, indices: int | Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Block outputs ``[N, D]`` after the chosen blocks (runs only as deep as needed).

        Args:
            pixel_values: ``[N, C*T*P*P]`` patches.
            grid_thw: ``[n, 3]`` grids.
            indices: Block indexes (negative count from the end), or an int ``k`` for the last
                ``k`` blocks, or ``None`` for every block.

        Returns:
            The features, in the order of ``indices``.
        """
        depth = len(self.blocks)
        if indices is None:
            wanted = list(range(depth))
        elif isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"indices = {indices}: the last-k count must be in [1, depth = {depth}]")
            wanted = list(range(depth - indices, depth))
        else:
            wanted = []
            for i in indices:
                j = i + depth if i < 0 else i
                if not 0 <= j < depth:
                    raise ValueError(f"block index {i} is outside the {depth} blocks")
                wanted.append(j)
        x, rope, layout, perm = self._grouped(pixel_values, grid_thw)
        feats: dict[int, torch.Tensor] = {}
        for i in range(max(wanted) + 1 if wanted else 0):
            x = self._run_block(i, x, rope, layout)
            feats[i] = x
        return [self._restore(feats[j], perm) for j in wanted]
