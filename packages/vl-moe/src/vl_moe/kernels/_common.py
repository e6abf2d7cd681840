"""Shared Triton helpers and the device guard of the MoE kernels (private).

:func:`mma` is ``tl.dot`` with one escape hatch: Triton's CPU interpreter (3.x) multiplies
bfloat16 tiles as their raw 16-bit integer patterns, so under the interpreter the kernels pass
``UPCAST=True`` and both tiles are converted to float32 first. Products of two bfloat16 or
float16 values are exact in float32, so the upcast result equals a tensor-core MMA with float32
accumulation up to the summation order.

:func:`grouped_tile` is the grouped rasterisation of Triton's matmul tutorial (vLLM's fused_moe
and Liger's fused MoE use it too): programs sweep ``GROUP_M`` row blocks across every column tile
before moving on, so a row block's gathered ``x`` (or ``h``/``dY``) rows are still in L2 when the
next column tile needs them, instead of being re-read from memory once per column tile.

Interpreter detection never imports ``triton.runtime.interpreter``: that module needs numpy,
which is not a dependency of vl-moe (only the interpreter, a test path, needs it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["INTERPRET", "check_device", "dry_run", "grouped_tile", "mma", "on_device"]


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # type: ignore[no-untyped-def]
    """``acc + a @ b`` with float32 accumulation (``a [M, K]``, ``b [K, N]``, ``acc [M, N]`` float32)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):  # type: ignore[no-untyped-def]
    """``(pid_m, pid_n)`` of 1-D program ``pid``: ``GROUP_M`` row blocks visit every column tile, then the next group.

    ``GROUP_M = 1`` is column-tile-fastest order (one row block at a time); a large ``GROUP_M`` tends to
    row-block-fastest order (each weight tile read by consecutive programs).
    """
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


INTERPRET: bool = not isinstance(mma, JITFunction)
"""Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at first import)."""

_DRY_RUN: ContextVar[bool] = ContextVar("vl_moe_kernels_dry_run", default=False)


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """Accept ``meta`` tensors in the device guard: for tools that record launches without running them.

    The compile check (``tests/gpu_compile``) drives the real launch code on ``meta`` tensors with
    Triton's launcher replaced by a recorder, so that every kernel specialisation the code produces
    is compiled for sm_90 without a GPU. Nothing launches a kernel on ``meta`` tensors otherwise.
    """
    token = _DRY_RUN.set(True)
    try:
        yield
    finally:
        _DRY_RUN.reset(token)


def check_device(what: str, *tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors``, or :class:`ValueError` naming ``what`` and the devices.

    CUDA tensors run compiled kernels; CPU tensors need Triton's interpreter, which is chosen when the
    kernels are first imported (``TRITON_INTERPRET=1``), so a CPU call without it is an error rather
    than a launch that reads host memory as device pointers.
    """
    devices = sorted({str(t.device) for t in tensors})
    if len(devices) != 1:
        raise ValueError(f"{what}: all inputs must be on one device, got {devices}")
    device = tensors[0].device
    if device.type == "cuda" or (device.type == "meta" and _DRY_RUN.get()):
        return device
    if device.type == "cpu":
        if INTERPRET:
            return device
        raise ValueError(
            f"{what}: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before vl_moe's kernels are "
            "first used (or move the inputs to CUDA, or use backend='torch')"
        )
    raise ValueError(f"{what}: the Triton kernels run on CUDA tensors (or CPU under the interpreter), got {device}")


def on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Make ``device`` current for the launches (Triton launches on the current CUDA device, not the tensors')."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
