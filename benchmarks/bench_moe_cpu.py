"""Question: is vl_moe's torch path at least as fast as transformers' Qwen3-VL-MoE experts on CPU?

Compares ``vl_moe.SparseMoeBlock(backend="torch")`` with transformers' ``Qwen3VLMoeTextSparseMoeBlock``
(same weights, loaded with ``load_state_dict(strict=True)``) under its two usable experts
implementations, ``eager`` (a Python loop over the hit experts) and ``grouped_mm`` (sort by expert,
``torch._grouped_mm``), at small shapes: T in {64, 512} tokens, H 256, I 128, E 16, k 4, float32.
Both sides include the router. Forward (no grad) and forward+backward (grads of x and all weights).
Outputs are checked equal (to float32 rounding) before timing. ``batched_mm`` is left out: it
materialises one weight matrix per (token, slot) pair and is ~100x slower at these shapes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import Row, compare

HIDDEN, INTER, EXPERTS, TOP_K = 256, 128, 16, 4


def _fwd(block: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def fn() -> object:
        with torch.no_grad():
            return block(x)

    return fn


def _fwd_bwd(block: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    x = x.clone().requires_grad_(True)
    grad = torch.randn_like(x)

    def fn() -> object:
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x).backward(grad)
        return x.grad

    return fn


def run(quick: bool) -> list[Row]:
    try:
        from transformers import Qwen3VLMoeTextConfig
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock
    except ImportError:
        print("bench_moe_cpu: transformers is not installed; no baseline to compare against")
        return []
    from vl_moe import SparseMoeBlock

    torch.manual_seed(0)
    ours = SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K, backend="torch")
    config = Qwen3VLMoeTextConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K
    )
    theirs = Qwen3VLMoeTextSparseMoeBlock(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    rows = []
    for tokens in (64, 512):
        x = torch.randn(1, tokens, HIDDEN)
        for impl in ("eager", "grouped_mm"):
            config._experts_implementation = impl
            with torch.no_grad():
                if not torch.allclose(theirs(x), ours(x), rtol=1e-4, atol=1e-6):
                    raise AssertionError(f"outputs differ from transformers ({impl}) at T={tokens}")
            for mode, make in (("forward", _fwd), ("forward+backward", _fwd_bwd)):
                rows.append(
                    compare(
                        "MoE block (CPU, float32)",
                        f"{mode}, T={tokens}, H={HIDDEN}, I={INTER}, E={EXPERTS}, k={TOP_K}",
                        baseline=f"transformers Qwen3VLMoeTextSparseMoeBlock ({impl})",
                        baseline_fn=make(theirs, x),
                        ours_fn=make(ours, x),
                        repeat=7 if quick else 25,
                        warmup=2 if quick else 5,
                        note="ours: SparseMoeBlock(backend='torch'); same weights",
                    )
                )
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row.case} vs {row.baseline}: {row.baseline_ms:.2f} ms vs {row.ours_ms:.2f} ms = {row.speedup:.2f}x")
