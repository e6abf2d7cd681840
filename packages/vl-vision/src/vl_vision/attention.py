"""Variable-length (per image / per frame) self-attention of the vision tower, without padding.

Every image, and every temporal patch of a video, attends only to itself (Qwen2-VL
arXiv 2409.12191 section 2.1 "naive dynamic resolution"; Qwen3-VL arXiv 2511.21631
section 2). Tokens of all images are packed in one ``[N, H, Dh]`` sequence described by
``cu_seqlens``; nothing is padded.

Backends:

- ``"sdpa"``: segments of equal length are gathered into one ``[B, H, L, Dh]`` batch and go
  through a single ``scaled_dot_product_attention`` call per distinct length (a block-diagonal
  attention without a mask and without padding); images of the same size batch together.
- ``"eager"``: the same grouping, with explicit matmul + float32 softmax.
- ``"flash"``: ``flash_attn_varlen_func`` on the packed sequence (CUDA, fp16/bf16; needs the
  ``flash`` extra).

Notation: ``N`` tokens, ``H`` heads, ``Dh`` head dim, ``S`` segments, ``L`` segment length.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VarlenLayout", "VisionAttention", "expand_rope", "rotate_neox", "varlen_attention"]


@dataclass(frozen=True)
class VarlenLayout:
    """How packed tokens split into attention segments, grouped by segment length.

    Attributes:
        cu_seqlens: ``[S + 1]`` int32 cumulative segment lengths (flash-attn layout) in token order.
        max_seqlen: Longest segment.
        groups: ``(length, start, count)`` per distinct segment length: after reordering the
            tokens by ``perm``, the ``count`` segments of that length are the contiguous rows
            ``[start, start + count * length)``.
        perm: ``[N]`` int64 token order that makes every group contiguous, or ``None`` when the
            tokens already are (e.g. all segments of one length, or sorted by length).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    groups: tuple[tuple[int, int, int], ...]
    perm: torch.Tensor | None = None

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device | str) -> VarlenLayout:
        """Layout for consecutive segments of the given lengths."""
        starts: dict[int, list[int]] = {}
        offset = 0
        runs: list[int] = []  # segment lengths in order, one entry per run of equal lengths
        for length in lengths:
            starts.setdefault(length, []).append(offset)
            if not runs or runs[-1] != length:
                runs.append(length)
            offset += length
        cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
        groups: list[tuple[int, int, int]] = []
        pos = 0
        for length, seg_starts in starts.items():
            groups.append((length, pos, len(seg_starts)))
            pos += length * len(seg_starts)
        perm = None
        if len(runs) != len(starts):  # some length occurs in two separate runs: gather needed
            base = torch.tensor([s for seg in starts.values() for s in seg], dtype=torch.int64)
            seg_len = torch.tensor([length for length, seg in starts.items() for _ in seg], dtype=torch.int64)
            perm = torch.repeat_interleave(base - torch.cumsum(seg_len, 0) + seg_len, seg_len)
            perm = (perm + torch.arange(int(seg_len.sum()))).to(device)
        return cls(cu, max(lengths, default=0), tuple(groups), perm)

    @classmethod
    def from_grid(cls, grid_thw: torch.Tensor, device: torch.device | str) -> VarlenLayout:
        """One segment of ``h * w`` tokens per temporal patch of every grid ``(t, h, w)``."""
        lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        return cls.from_lengths(lengths, device)

    def grouped(self) -> VarlenLayout:
        """The layout of the tokens after reordering by ``perm`` (groups contiguous, ``perm=None``)."""
        if self.perm is None:
            return self
        lengths = [length for length, _, count in self.groups for _ in range(count)]
        cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(self.cu_seqlens)
        return VarlenLayout(cu, self.max_seqlen, self.groups, None)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    # softmax in at least float32 (float64 inputs keep float64)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores, dim=-1, dtype=acc).to(q.dtype)
    return torch.matmul(probs, v)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VarlenLayout, scale: float) -> torch.Tensor:
    try:
        flash_attn = importlib.import_module("flash_attn")
    except ImportError as e:
        raise ImportError("attn_implementation='flash' needs flash-attn: pip install 'vl-vision[flash]'") from e
    n = layout.max_seqlen
    return flash_attn.flash_attn_varlen_func(
        q, k, v, layout.cu_seqlens, layout.cu_seqlens, n, n, softmax_scale=scale, causal=False
    )


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VarlenLayout, *, backend: str = "sdpa"
) -> torch.Tensor:
    """Bidirectional attention within each segment of packed ``[N, H, Dh]`` queries/keys/values.

    Args:
        q: Queries ``[N, H, Dh]``.
        k: Keys ``[N, H, Dh]``.
        v: Values ``[N, H, Dh]``.
        layout: The segments (see ``VarlenLayout``).
        backend: ``"sdpa"``, ``"eager"`` or ``"flash"``.

    Returns:
        ``[N, H, Dh]`` attention output.
    """
    n, heads, dh = q.shape
    scale = dh**-0.5
    if backend == "flash":
        return _flash(q, k, v, layout, scale)
    if backend not in ("sdpa", "eager"):
        raise ValueError(f"attention backend must be 'sdpa', 'eager' or 'flash', got {backend!r}")
    total = int(layout.cu_seqlens[-1]) if layout.cu_seqlens.numel() else 0
    if total != n:
        raise ValueError(f"the attention layout covers {total} tokens but q has {n} rows")

    def attend(qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor) -> torch.Tensor:
        if backend == "sdpa":
            return F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
        return _eager(qg, kg, vg, scale)

    if layout.perm is not None:  # reorder so that equal-length segments are contiguous, and back
        perm = layout.perm
        out = varlen_attention(q[perm], k[perm], v[perm], layout.grouped(), backend=backend)
        return torch.empty_like(out).index_copy(0, perm, out)
    sizes = [length * count for length, _, count in layout.groups]
    if len(sizes) == 1:  # one segment length: plain views, no copies
        parts = [(q, k, v)]
    else:  # split (not slice): its backward is one cat instead of a zero-filled buffer per group
        parts = list(zip(q.split(sizes), k.split(sizes), v.split(sizes)))
    outs = []
    for (length, _, count), (qg, kg, vg) in zip(layout.groups, parts):
        view = lambda x, count=count, length=length: x.view(count, length, heads, dh).transpose(1, 2)
        outs.append(attend(view(qg), view(kg), view(vg)).transpose(1, 2).reshape(count * length, heads, dh))
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs) if outs else q.new_empty(0, heads, dh)


def expand_rope(cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles ``[N, Dh]`` -> contiguous float32 ``[N, 1, H, Dh/2]`` tables for :func:`rotate_neox`.

    The 2-D RoPE repeats its angles over the two halves of a head, so half of each table is kept.
    Computed once per forward and shared by all blocks: broadcasting ``[N, 1, 1, Dh/2]`` over the
    heads inside every block is several times slower on CPU than reading a contiguous table.
    """
    half = cos.shape[-1] // 2
    shape = (cos.shape[0], 1, num_heads, half)
    return (
        cos[:, None, None, :half].float().expand(shape).contiguous(),
        sin[:, None, None, :half].float().expand(shape).contiguous(),
    )


def rotate_neox(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``qk * cos + rotate_half(qk) * sin`` in float32, on the two halves of each head.

    With ``x = [x1, x2]`` and angles repeated over the halves the rotation is
    ``[x1 c - x2 s, x2 c + x1 s]``: products on half-width tensors and one concat instead of the
    concat, negation, full-width products and sum of ``rotate_half``. Plain products and sums (no
    fused multiply-add), so the float32 roundings, hence the values, equal the reference's.

    Args:
        qk: ``[N, 2, H, Dh]`` queries and keys (any float dtype; rotated in float32, returned in it).
        cos: ``[N, Dh]`` angles' cosines, or the ``[N, 1, H, Dh/2]`` table of :func:`expand_rope`.
        sin: Like ``cos``.
    """
    if cos.dim() == 2:
        cos, sin = expand_rope(cos, sin, qk.shape[2])
    half = qk.shape[-1] // 2
    qkf = qk.float()
    x1, x2 = qkf[..., :half], qkf[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(qk.dtype)


class VisionAttention(nn.Module):
    """Multi-head self-attention with fused qkv, 2-D RoPE and varlen segments.

    Keys: ``qkv.weight [3D, D]`` (+ ``qkv.bias``), ``proj.weight [D, D]`` (+ ``proj.bias``).

    Args:
        dim: Width ``D``.
        num_heads: Heads ``H``.
        qkv_bias: Bias on the qkv projection.
        proj_bias: Bias on the output projection.
        backend: ``"sdpa"``, ``"eager"`` or ``"flash"``.
    """

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool = True, proj_bias: bool = True, backend: str = "sdpa"
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim = {dim} is not divisible by num_heads = {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, layout: VarlenLayout
    ) -> torch.Tensor:
        """``[N, D] -> [N, D]``; ``rope`` is the ``(cos, sin)`` pair ``[N, Dh]`` (NeoX layout, the angles
        repeated over both halves as ``vl_rope.VisionRoPE2D`` makes them), its ``expand_rope`` tables,
        or ``None``."""
        n = x.shape[0]
        qk, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).split([2, 1], dim=1)
        if rope is not None:
            # one float32 rotation of q and k together, as the Qwen-VL / GLM towers rotate in float32
            # (arXiv 2511.21631 section 2); ``[N, 2, H, Dh]`` against cos/sin ``[N, Dh]``
            qk = rotate_neox(qk, rope[0], rope[1])
        q, k = qk.unbind(1)
        out = varlen_attention(q, k, v.squeeze(1), layout, backend=self.backend)
        return self.proj(out.reshape(n, -1))
