"""SigLIP-2 vision encoder interop: initialise our tower from it, or run it exactly.

SigLIP 2 (Tschannen et al., arXiv 2502.14786) is a ViT trained with a sigmoid image-text loss;
its NaFlex variant (section 2.4) takes images at native aspect ratio as up to ``L`` patches,
resizes its learned ``s x s`` position table to every image's ``(h, w)`` patch grid (bilinear,
antialias) and masks padded patches in attention. Qwen3-VL starts its vision tower from it
(arXiv 2511.21631 section 2).

- ``from_siglip2``: our ``VisionTransformer`` initialised from a SigLIP-2 checkpoint (see
  ``_siglip2_convert``); the merger and DeepStack mergers stay freshly initialised.
- ``Siglip2VisionEncoder``: plain SigLIP-2 features, equal to transformers' ``Siglip2VisionModel``
  (``last_hidden_state`` and, when the checkpoint has one, the MAP head's ``pooler_output``),
  built from our ``VisionBlock`` / ``VisionAttention`` (``rope=None``). ``forward`` takes
  transformers' padded inputs; ``forward_packed`` the padding-free packed layout.
- ``qwen_patches_to_siglip2``: our processor's ``[N, C*T*P*P]`` merge-block rows as SigLIP's
  channel-last raster patches (first frame of every temporal patch).

Notation: ``B`` images, ``L`` padded patches per image, ``N`` packed patches, ``D`` width,
``P`` patch side, ``C`` channels, ``T`` temporal patch, ``s`` table side, ``H`` heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vl_rope import vision_position_ids

from ._checks import check_grid
from ._siglip2_convert import Siglip2EncoderConfig, block_state, from_siglip2, load_siglip2
from .attention import VarlenLayout, VisionAttention
from .block import VisionBlock
from .layers import GeluMLP

__all__ = [
    "Siglip2EncoderConfig",
    "Siglip2EncoderOutput",
    "Siglip2PoolingHead",
    "Siglip2VisionEncoder",
    "from_siglip2",
    "qwen_patches_to_siglip2",
]


@dataclass
class Siglip2EncoderOutput:
    """What ``Siglip2VisionEncoder`` returns.

    Attributes:
        last_hidden_state: ``[B, L, D]`` (``forward``) or ``[N, D]`` (``forward_packed``), after
            ``post_layernorm``.
        pooler_output: ``[B, D]`` MAP-head output, or ``None`` without a head.
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None


class Siglip2PoolingHead(nn.Module):
    """Multi-head attention pooling (MAP): a learned probe attends over the valid patches.

    ``a = proj(attn(probe, x, x))``; output ``a + mlp(norm(a))`` (no residual from the probe, as
    SigLIP). Keys: ``probe [1, 1, D]``, ``qkv`` (``nn.MultiheadAttention``'s ``in_proj``),
    ``proj``, ``norm``, ``mlp.linear_fc1/2``.

    Args:
        dim: Width ``D``.
        num_heads: Heads ``H``.
        hidden: MLP hidden width.
        act: MLP activation name.
        eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, num_heads: int, hidden: int, act: str, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.probe = nn.Parameter(torch.randn(1, 1, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = GeluMLP(dim, hidden, act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool ``[B, L, D]`` (``mask [B, L]``: 1 for valid patches) to ``[B, D]``."""
        b, l, d = x.shape
        h = self.num_heads
        wq, wkv = self.qkv.weight.split([d, 2 * d])
        bq, bkv = self.qkv.bias.split([d, 2 * d])
        q = F.linear(self.probe.expand(b, 1, d), wq, bq).view(b, 1, h, -1).transpose(1, 2)
        k, v = F.linear(x, wkv, bkv).view(b, l, 2, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        keep = None if mask is None else mask.bool()[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        a = self.proj(a.transpose(1, 2).reshape(b, 1, d))
        return (a + self.mlp(self.norm(a)))[:, 0]


def _masked_block(block: VisionBlock, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``block`` on a padded batch ``[B, L, D]``: keys masked by ``keep [B, 1, 1, L]``, every query kept.

    Padded query rows are computed too (they attend to the valid patches), so every row equals
    the reference's; the packed path (``VisionBlock.forward``) skips them.
    """
    b, l, d = x.shape
    attn = block.attn
    qkv = attn.qkv(block.norm1(x)).view(b, l, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    x = x + attn.proj(a.transpose(1, 2).reshape(b, l, d))
    return x + block.mlp(block.norm2(x))


class Siglip2VisionEncoder(nn.Module):
    """transformers' ``Siglip2VisionModel`` rebuilt from our blocks (exact-mode SigLIP-2 features).

    Keys: ``patch_embedding.*`` (Linear over channel-last patches ``[D, P*P*C]``),
    ``position_embedding.weight [s*s, D]``, ``blocks.{i}.*`` (``VisionBlock``),
    ``post_layernorm.*``, ``head.*`` (``Siglip2PoolingHead``, when ``vision_use_head``).

    Args:
        config: The SigLIP-2 hyper-parameters.

    Example:
        >>> cfg = Siglip2EncoderConfig(
        ...     hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, patch_size=4
        ... )
        >>> enc = Siglip2VisionEncoder(cfg)
        >>> out = enc.forward_packed(torch.randn(6 + 4, 48), torch.tensor([[2, 3], [2, 2]]))
        >>> out.last_hidden_state.shape, out.pooler_output.shape
        (torch.Size([10, 32]), torch.Size([2, 32]))
    """

    def __init__(self, config: Siglip2EncoderConfig) -> None:
        super().__init__()
        self.config = config
        d, c, p = config.hidden_size, config.num_channels, config.patch_size
        self.patch_embedding = nn.Linear(p * p * c, d)
        self.position_embedding = nn.Embedding(config.num_patches, d)
        self.blocks = nn.ModuleList(self._block() for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.head: Siglip2PoolingHead | None = None
        if config.vision_use_head:
            self.head = Siglip2PoolingHead(
                d, config.num_attention_heads, config.intermediate_size, config.hidden_act, config.layer_norm_eps
            )

    def _block(self) -> VisionBlock:
        cfg = self.config
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        attn = VisionAttention(d, cfg.num_attention_heads, backend="sdpa")
        mlp = GeluMLP(d, cfg.intermediate_size, cfg.hidden_act)
        return VisionBlock(nn.LayerNorm(d, eps=eps), attn, nn.LayerNorm(d, eps=eps), mlp)

    @classmethod
    def from_siglip2(cls, source: Any, *, dtype: torch.dtype | None = None) -> Siglip2VisionEncoder:
        """Build from a SigLIP-2 checkpoint (see ``load_siglip2``); every key is loaded strictly.

        Args:
            source: Directory, transformers model, or ``(state_dict, config)`` pair.
            dtype: Parameter dtype; ``None`` takes the checkpoint's.
        """
        state, config = load_siglip2(source)
        encoder = cls(config).to(dtype or state["embeddings.patch_embedding.weight"].dtype)
        ours = {
            "patch_embedding.weight": state["embeddings.patch_embedding.weight"],
            "patch_embedding.bias": state["embeddings.patch_embedding.bias"],
            "position_embedding.weight": state["embeddings.position_embedding.weight"],
            "post_layernorm.weight": state["post_layernorm.weight"],
            "post_layernorm.bias": state["post_layernorm.bias"],
        }
        for i in range(config.num_hidden_layers):
            ours.update({f"blocks.{i}.{k}": v for k, v in block_state(state, i).items()})
        if config.vision_use_head:
            head = {
                "probe": "probe",
                "qkv.weight": "attention.in_proj_weight",
                "qkv.bias": "attention.in_proj_bias",
                "proj.weight": "attention.out_proj.weight",
                "proj.bias": "attention.out_proj.bias",
                "norm.weight": "layernorm.weight",
                "norm.bias": "layernorm.bias",
                "mlp.linear_fc1.weight": "mlp.fc1.weight",
                "mlp.linear_fc1.bias": "mlp.fc1.bias",
                "mlp.linear_fc2.weight": "mlp.fc2.weight",
                "mlp.linear_fc2.bias": "mlp.fc2.bias",
            }
            ours.update({f"head.{k}": state[f"head.{v}"] for k, v in head.items()})
        encoder.load_state_dict(ours, strict=True)
        return encoder.eval()

    # ------------------------------------------------------------------ embeddings

    def _resized_tables(self, shapes: list[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
        """The position table resized to each distinct ``(h, w)``: ``[h*w, D]`` in raster order."""
        table = self.position_embedding.weight
        s = self.config.position_side
        grid = table.reshape(s, s, -1).permute(2, 0, 1)[None]
        if grid.device.type == "cpu":  # as the reference: antialias on CPU runs in float32, whatever the dtype
            grid = grid.float()
        out: dict[tuple[int, int], torch.Tensor] = {}
        for h, w in dict.fromkeys(shapes):
            if h <= 0 or w <= 0:
                raise ValueError(f"spatial_shapes has ({h}, {w}); both sides must be positive")
            r = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            out[(h, w)] = r[0].reshape(table.shape[1], h * w).t().to(table.dtype)
        return out

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        width = self.patch_embedding.in_features
        if pixel_values.shape[-1] != width:
            p, c = self.config.patch_size, self.config.num_channels
            raise ValueError(
                f"pixel_values rows have width {pixel_values.shape[-1]}, expected P*P*C = {p}*{p}*{c} = {width}"
            )
        return self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))

    # ------------------------------------------------------------------ forward

    def forward(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> Siglip2EncoderOutput:
        """transformers' ``Siglip2VisionModel.forward`` on the same inputs.

        Args:
            pixel_values: ``[B, L, P*P*C]`` channel-last patches, each image's ``h*w`` patches in
                raster order first, then padding.
            pixel_attention_mask: ``[B, L]``, 1 for real patches.
            spatial_shapes: ``[B, 2]`` patch grid ``(h, w)`` of each image.

        Returns:
            ``last_hidden_state [B, L, D]`` (padded rows computed as the reference does) and
            ``pooler_output [B, D]`` (``None`` without a head).
        """
        if pixel_values.dim() != 3:
            raise ValueError(f"pixel_values must be [B, L, P*P*C], got shape {tuple(pixel_values.shape)}")
        b, l, _ = pixel_values.shape
        if tuple(pixel_attention_mask.shape) != (b, l) or tuple(spatial_shapes.shape) != (b, 2):
            raise ValueError(
                f"pixel_attention_mask must be [{b}, {l}] and spatial_shapes [{b}, 2], got "
                f"{tuple(pixel_attention_mask.shape)} and {tuple(spatial_shapes.shape)}"
            )
        x = self._embed(pixel_values)
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        tables = self._resized_tables(shapes)
        pos = torch.empty_like(x)
        for i, (h, w) in enumerate(shapes):
            if h * w > l:
                raise ValueError(f"spatial_shapes[{i}] = ({h}, {w}) has {h * w} patches, more than L = {l}")
            table = tables[(h, w)]
            pos[i, : h * w] = table
            pos[i, h * w :] = table[0]  # the reference gives padding the first position
        x = x + pos
        keep = pixel_attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = _masked_block(block, x, keep)  # type: ignore[arg-type]
        x = self.post_layernorm(x)
        pooled = self.head(x, pixel_attention_mask) if self.head is not None else None
        return Siglip2EncoderOutput(last_hidden_state=x, pooler_output=pooled)

    def forward_packed(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> Siglip2EncoderOutput:
        """The same features on packed patches, without padding (varlen attention).

        Args:
            pixel_values: ``[N, P*P*C]``: the raster-order patches of every image, one after another.
            spatial_shapes: ``[n, 2]`` patch grid ``(h, w)`` of each image (``N = sum h*w``).

        Returns:
            ``last_hidden_state [N, D]`` (the reference's valid rows) and ``pooler_output [n, D]``.
        """
        if pixel_values.dim() != 2:
            raise ValueError(f"pixel_values must be [N, P*P*C], got shape {tuple(pixel_values.shape)}")
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        lengths = [h * w for h, w in shapes]
        if sum(lengths) != pixel_values.shape[0]:
            raise ValueError(
                f"spatial_shapes describe {sum(lengths)} patches but pixel_values has {pixel_values.shape[0]} rows"
            )
        tables = self._resized_tables(shapes)
        x = self._embed(pixel_values) + torch.cat([tables[s] for s in shapes])
        layout = VarlenLayout.from_lengths(lengths, x.device)
        for block in self.blocks:
            x = block(x, None, layout)
        x = self.post_layernorm(x)
        pooled = None
        if self.head is not None:
            padded = nn.utils.rnn.pad_sequence(list(x.split(lengths)), batch_first=True)
            mask = (
                torch.arange(padded.shape[1], device=x.device)[None] < torch.tensor(lengths, device=x.device)[:, None]
            )
            pooled = self.head(padded, mask)
        return Siglip2EncoderOutput(last_hidden_state=x, pooler_output=pooled)


def qwen_patches_to_siglip2(
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    *,
    in_channels: int = 3,
    patch_size: int = 16,
    temporal_patch_size: int = 2,
    spatial_merge_size: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our processor's rows as ``Siglip2VisionEncoder.forward_packed`` inputs.

    Every temporal patch of every grid becomes one image (its first frame; a still image's
    ``T`` frames are copies); rows go from ``(c, t, py, px)`` merge-block order to SigLIP's
    ``(py, px, c)`` raster order.

    Args:
        pixel_values: ``[N, C*T*P*P]`` from ``ImageProcessor`` / ``VideoProcessor``.
        grid_thw: ``[n, 3]`` grids ``(t, h, w)``.
        in_channels: ``C``.
        patch_size: ``P``.
        temporal_patch_size: ``T``.
        spatial_merge_size: ``m`` of the merge-block order.

    Returns:
        ``(patches [N / T, P*P*C], spatial_shapes [sum t, 2])``.
    """
    grid = check_grid(grid_thw, spatial_merge_size)
    c, t, p = in_channels, temporal_patch_size, patch_size
    if pixel_values.dim() != 2 or pixel_values.shape[1] != c * t * p * p:
        raise ValueError(f"pixel_values must be [N, C*T*P*P] = [N, {c * t * p * p}], got {tuple(pixel_values.shape)}")
    if int(grid.prod(-1).sum()) != pixel_values.shape[0]:
        raise ValueError(f"grid_thw describes {int(grid.prod(-1).sum())} patches, pixel_values has {len(pixel_values)}")
    rows = pixel_values.reshape(-1, c, t, p, p)[:, :, 0].permute(0, 2, 3, 1).reshape(-1, p * p * c)
    grid = grid.to(pixel_values.device)
    rc = vision_position_ids(grid, spatial_merge_size)
    frames = grid[:, 1:].repeat_interleave(grid[:, 0], dim=0)  # one (h, w) per temporal patch
    sizes = frames[:, 0] * frames[:, 1]
    starts = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    width = torch.repeat_interleave(frames[:, 1], sizes)
    dest = starts + rc[:, 0] * width + rc[:, 1]
    return torch.empty_like(rows).index_copy(0, dest, rows), frames
