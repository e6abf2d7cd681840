"""Small building blocks of the vision tower: norms, activations and the two block MLPs.

- ``GeluMLP``: ``fc2(act(fc1(x)))``, the SigLIP-2 / Qwen3-VL ViT MLP (keys ``linear_fc1``,
  ``linear_fc2``; Qwen3-VL report arXiv 2511.21631 section 2).
- ``SwiGLU``: ``down(act(gate(x)) * up(x))``, the GLM-4.1V/4.5V ViT MLP and merger (arXiv
  2507.01006 section 2; keys ``gate_proj``, ``up_proj``, ``down_proj`` as GLM's checkpoints).
- ``RMSNorm``: statistics in float32, weight applied in the input dtype (GLM's norm).

Notation: ``N`` tokens, ``D`` width, ``I`` MLP hidden width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GeluMLP", "RMSNorm", "SwiGLU", "activation", "make_norm"]


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called ``name`` in transformers' configs.

    Raises:
        ValueError: an unknown name.
    """
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu": F.gelu,
        "silu": F.silu,
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "relu": F.relu,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(table)}")
    return table[name]


class RMSNorm(nn.Module):
    """Root-mean-square norm ``x / rms(x) * weight`` (statistics in float32).

    Args:
        dim: Normalised width ``D``.
        eps: Added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [..., D]``."""
        dtype = x.dtype
        xf = x.float()  # float32 statistics for every input dtype, as GLM's reference norm
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """``nn.LayerNorm`` for ``"layernorm"``, ``RMSNorm`` for ``"rmsnorm"``."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class GeluMLP(nn.Module):
    """Two-layer MLP ``linear_fc2(act(linear_fc1(x)))``.

    Args:
        dim: Input and output width ``D``.
        hidden: Hidden width ``I``.
        act: Activation name (see ``activation``).
        bias: Biases on both linears.
    """

    def __init__(self, dim: int, hidden: int, act: str = "gelu_pytorch_tanh", bias: bool = True) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden, bias=bias)
        self.linear_fc2 = nn.Linear(hidden, dim, bias=bias)
        self.act_name = act
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, D] -> [N, D]``."""
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class SwiGLU(nn.Module):
    """Gated MLP ``down_proj(act(gate_proj(x)) * up_proj(x))``.

    Args:
        dim: Input width ``D``.
        hidden: Hidden width ``I``.
        act: Activation name of the gate (``silu`` for SwiGLU).
        bias: Biases on the three linears.
        out_dim: Output width (default ``dim``).
    """

    def __init__(
        self, dim: int, hidden: int, act: str = "silu", bias: bool = False, out_dim: int | None = None
    ) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, out_dim or dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, D] -> [N, out_dim]``."""
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
