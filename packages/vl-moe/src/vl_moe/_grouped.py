"""Grouped matrix multiplications over tokens sorted by expert (the building block of the torch path).

Rows ``[S, *]`` are sorted by expert, expert ``e`` owning rows ``offsets[e-1]:offsets[e]``
(``offsets`` is the inclusive cumulative count). Three products cover forward and backward:

- :func:`gmm_nt` ``a [S, K], w [E, N, K] -> [S, N]``: ``a_e @ w_e^T`` (a linear layer per expert),
- :func:`gmm_nn` ``a [S, N], w [E, N, K] -> [S, K]``: ``a_e @ w_e`` (its input gradient),
- :func:`gmm_tn` ``a [S, M], b [S, N] -> [E, M, N]``: ``a_e^T @ b_e`` (its weight gradient; zero for
  experts without rows).

Each uses ``torch._grouped_mm`` (one call for all experts) where it supports the tensors (float32 /
bfloat16 / float16, 16-byte aligned strides, CPU or CUDA sm80+), else a loop over the non-empty
experts only, on contiguous slices (no gather, no atomics: deterministic).

Notation: ``S`` routed (token, slot) pairs, ``E`` experts.
"""

from __future__ import annotations

import torch

__all__ = ["Groups", "gmm_nn", "gmm_nt", "gmm_tn", "grouped_mm_supported"]

_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Groups:
    """Row groups of the sorted pairs: ``offsets`` (int32, on device) and, lazily, host-side counts.

    Args:
        counts: Rows per expert ``[E]`` (integer tensor).
    """

    def __init__(self, counts: torch.Tensor) -> None:
        self.num_experts = counts.numel()
        self.offsets = torch.cumsum(counts, dim=0).to(torch.int32)
        self._counts = counts
        self._host: list[int] | None = None

    def host_counts(self) -> list[int]:
        """Rows per expert as Python ints (one device sync; only the loop fallback needs it)."""
        if self._host is None:
            self._host = [int(c) for c in self._counts.tolist()]
        return self._host


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    if t.data_ptr() % 16:
        return False
    return all(stride == 1 or (stride * size) % 16 == 0 for stride in t.stride())


def grouped_mm_supported(*tensors: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` accepts these operands (dtype, device, 16-byte alignment)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    first = tensors[0]
    if first.dtype not in _GMM_DTYPES:
        return False
    if first.device.type == "cpu" and first.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        # The CPU fake-tensor kernel of ``_grouped_mm`` accepts only bfloat16: compile the loop instead.
        return False
    if first.device.type == "cuda":
        if torch.cuda.get_device_capability(first.device) < (8, 0):
            return False
    elif first.device.type != "cpu":
        return False
    return all(_aligned(t) for t in tensors)


def _gmm(a: torch.Tensor, b: torch.Tensor, groups: Groups) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=groups.offsets)


def gmm_nt(a: torch.Tensor, w: torch.Tensor, groups: Groups, *, use_grouped_mm: bool | None = None) -> torch.Tensor:
    """``out[rows of e] = a[rows of e] @ w[e]^T``: ``a [S, K], w [E, N, K] -> [S, N]``."""
    wt = w.transpose(1, 2)
    if use_grouped_mm is not False and grouped_mm_supported(a, wt):
        return _gmm(a, wt, groups)
    out = a.new_empty(a.shape[0], w.shape[1])
    start = 0
    for e, count in enumerate(groups.host_counts()):
        if count:
            torch.mm(a[start : start + count], w[e].t(), out=out[start : start + count])
            start += count
    return out


def gmm_nn(a: torch.Tensor, w: torch.Tensor, groups: Groups, *, use_grouped_mm: bool | None = None) -> torch.Tensor:
    """``out[rows of e] = a[rows of e] @ w[e]``: ``a [S, N], w [E, N, K] -> [S, K]``."""
    if use_grouped_mm is not False and grouped_mm_supported(a, w):
        return _gmm(a, w, groups)
    out = a.new_empty(a.shape[0], w.shape[2])
    start = 0
    for e, count in enumerate(groups.host_counts()):
        if count:
            torch.mm(a[start : start + count], w[e], out=out[start : start + count])
            start += count
    return out


def gmm_tn(a: torch.Tensor, b: torch.Tensor, groups: Groups, *, use_grouped_mm: bool | None = None) -> torch.Tensor:
    """``out[e] = a[rows of e]^T @ b[rows of e]``: ``a [S, M], b [S, N] -> [E, M, N]`` (zeros if no rows)."""
    at = a.t()
    if use_grouped_mm is not False and grouped_mm_supported(at, b):
        return _gmm(at, b, groups)
    out = a.new_zeros(groups.num_experts, a.shape[1], b.shape[1])
    start = 0
    for e, count in enumerate(groups.host_counts()):
        if count:
            torch.mm(at[:, start : start + count], b[start : start + count], out=out[e])
            start += count
    return out
