"""Timers of the GPU run: CUDA-graph replay or event timing on a GPU, the wall clock in the CPU smoke run.

``bench_ms`` asks ``triton.testing.do_bench_cudagraph`` first (the function captured ``n`` times in
one graph and replayed: launch gaps vanish, as under CUDA-graph decoding); a function that cannot
be captured (a host synchronisation, e.g. transformers' eager experts' ``nonzero``) falls back to
``triton.testing.do_bench``, which times each call with CUDA events and flushes the L2 cache before
each. Both return the median in milliseconds; the method used is returned too, for the report.
``ceilings`` measures the two numbers of the roofline on the card at hand (METHOD.md: datasheet
rates are only leads): a large bf16 matrix product and a device-to-device copy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def bench_ms(fn: Callable[[], object], *, device: str, rep_ms: float = 40.0, graph: bool = True) -> tuple[float, str]:
    """``(median ms, method)`` of ``fn()``; ``method`` is ``"cuda graph"``, ``"events + L2 flush"`` or ``"wall"``."""
    if device != "cuda":
        fn()  # warm-up (compilation under the interpreter)
        samples = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples), "wall"
    import triton.testing

    if graph:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")), "cuda graph"
        except Exception as err:  # not capturable: time it with events instead
            torch.cuda.synchronize()
            print(f"  (no CUDA graph: {type(err).__name__}: {str(err).splitlines()[0][:100]}; timing with events)")
    ms = triton.testing.do_bench(fn, warmup=max(10.0, rep_ms / 4), rep=rep_ms, return_mode="median")
    return float(ms), "events + L2 flush"


def wall_ms(fn: Callable[[], object], *, device: str, repeat: int = 3) -> float:
    """Median wall time of whole calls (for host-driven loops such as ``generate``), synchronised."""
    fn()
    samples = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def ceilings(device: str) -> dict[str, float]:
    """Measured bf16 matrix rate (TFLOP/s) and copy bandwidth (TB/s, bytes read + written) of this card."""
    if device != "cuda":
        return {"tflops": float("nan"), "tbps": float("nan")}
    n, words = 8192, 512 * 2**20  # an 8192^3 product; a 2 GiB float32 copy

    def matmul_ms() -> float:
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        return bench_ms(lambda: a @ b, device=device, rep_ms=100.0, graph=False)[0]

    def copy_ms() -> float:
        src = torch.randn(words, device="cuda", dtype=torch.float32)
        dst = torch.empty_like(src)
        return bench_ms(lambda: dst.copy_(src), device=device, rep_ms=100.0, graph=False)[0]

    found = {"tflops": 2 * n**3 / matmul_ms() / 1e9, "tbps": 2 * words * 4 / copy_ms() / 1e9}
    torch.cuda.empty_cache()
    return found
