"""Fused Triton rotary (``apply_rotary_fused``) vs torch eager and ``torch.compile`` ``apply_rotary``.

Question: how much does one fused launch over ``q`` and ``k`` save over the torch
rotation, forward and forward+backward, at a Qwen3-class text-attention shape
(``B=4, L=4096, Hq=32, Hk=8, D=128``, bf16; ``q``/``k`` are ``[B, H, L, D]``
transposes of ``[B, L, H, D]`` projection outputs, as in the model)?

The baselines run ``apply_rotary`` with its default ``upcast=False`` (bf16
arithmetic, what the text model runs); ours computes in float32 and rounds
once, so it does at least as much arithmetic. CUDA only: without it ``run``
returns no rows (Triton's CPU interpreter is a test path, not a performance one).

Usage: ``python benchmarks/bench_apply_rotary.py [--quick]`` or through ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/bench_apply_rotary.py` puts only benchmarks/ on sys.path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._harness import Row, compare  # noqa: E402
from vl_rope.apply import apply_rotary  # noqa: E402
from vl_rope.triton_rotary import HAS_TRITON, apply_rotary_fused  # noqa: E402

NAME = "apply_rotary"
Rotary = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _inputs(quick: bool) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, seq, hq, hk, d = (1, 1024, 32, 8, 128) if quick else (4, 4096, 32, 8, 128)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, seq, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    k = torch.randn(b, seq, hk, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    inv_freq = 1.0 / (1_000_000.0 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d))
    freqs = torch.arange(seq, device="cuda", dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).expand(b, seq, d)
    case = f"B={b} L={seq} Hq={hq} Hk={hk} D={d} bf16"
    return case, q, k, emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def _forward(
    fn: Rotary, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> Callable[[], object]:
    def step() -> object:
        with torch.no_grad():
            return fn(q, k, cos, sin)

    return step


def _fwd_bwd(
    fn: Rotary, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> Callable[[], object]:
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    grads = (torch.randn_like(q), torch.randn_like(k))

    def step() -> object:
        return torch.autograd.grad(fn(q, k, cos, sin), (q, k), grads)

    return step


def run(quick: bool) -> list[Row]:
    """Rows for forward and forward+backward against eager and compiled torch (``[]`` without CUDA)."""
    if not torch.cuda.is_available():
        print(f"{NAME}: skipped, needs CUDA (the Triton CPU interpreter is not a performance path)")
        return []
    if not HAS_TRITON:
        print(f"{NAME}: skipped, triton is not installed (pip install vl-rope[triton])")
        return []
    case, q, k, cos, sin = _inputs(quick)
    want, got = apply_rotary(q.float(), k.float(), cos.float(), sin.float()), apply_rotary_fused(q, k, cos, sin)
    for w, g in zip(want, got, strict=True):  # sanity: parity before timing
        torch.testing.assert_close(g.float(), w.to(g.dtype).float(), rtol=2**-7, atol=1e-2)

    device = f"cuda ({torch.cuda.get_device_name()})"
    repeat, warmup = (5, 2) if quick else (20, 5)
    baselines: list[tuple[str, Rotary]] = [("torch eager apply_rotary", apply_rotary)]
    try:
        compiled: Rotary = torch.compile(apply_rotary)
        _fwd_bwd(compiled, q, k, cos, sin)()
        baselines.append(("torch.compile(apply_rotary)", compiled))
    except Exception as exc:  # e.g. no C compiler for inductor: report the eager rows only
        print(f"{NAME}: torch.compile baseline skipped ({type(exc).__name__}: {exc})")

    rows = []
    for baseline, fn in baselines:
        for label, make in (("forward", _forward), ("forward+backward", _fwd_bwd)):
            rows.append(
                compare(
                    NAME,
                    f"{label}, {case}",
                    baseline=baseline,
                    baseline_fn=make(fn, q, k, cos, sin),
                    ours_fn=make(apply_rotary_fused, q, k, cos, sin),
                    device="cuda",
                    warmup=warmup,
                    repeat=repeat,
                    note=device,
                )
            )
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv[1:]):
        print(f"{row.case} | vs {row.baseline}: {row.baseline_ms:.3f} ms -> {row.ours_ms:.3f} ms ({row.speedup:.2f}x)")
