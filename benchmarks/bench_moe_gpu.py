"""Triton MoE experts (``vl_moe.kernels.triton_moe_experts``) vs transformers' eager and grouped_mm experts.

Question: at the Qwen3-VL-30B-A3B MoE layer shape (hidden 2048, 128 experts, top-8, expert width
768, bf16) how fast are our kernels, forward and forward+backward, from 1-token decode to 16K-token
prefill/training, for balanced, Zipf-skewed and real-router routing, against transformers'
``Qwen3VLMoeTextExperts`` with ``experts_implementation="eager"`` and ``"grouped_mm"`` in the same
process, and against the H200 roofline?

Each row's note gives our TFLOP/s (75.5 MFLOP per token forward, x3 for forward+backward) and the
fraction of the roofline time ``max(FLOPs / 790 TFLOP/s, bytes / 4.8 TB/s)`` that we reach; bytes
count the expert weights the routing touches (read once forward; read, re-read and written as
gradients forward+backward) plus the token activations. Goals (issue 4): 16K tokens forward
>= 450 TFLOP/s, forward+backward >= 380 TFLOP/s; 1-token decode <= 30 us; >= 1.3x grouped_mm at
>= 4K tokens; skewed within 1.5x of balanced.

CUDA only: without it ``run`` returns no rows (Triton's CPU interpreter is a test path).
Usage: ``python benchmarks/bench_moe_gpu.py [--quick]`` or through ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/bench_moe_gpu.py` puts only benchmarks/ on sys.path
    sys.path.insert(0, str(ROOT))
_SRC = ROOT / "packages" / "vl-moe" / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:  # run from a checkout without installing vl-moe
    sys.path.append(str(_SRC))

import torch  # noqa: E402

from benchmarks._harness import Row, compare  # noqa: E402

NAME = "moe_gpu"
HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8
FLOP_PER_TOKEN = 2 * 3 * HIDDEN * INTER * TOP_K  # 75.5e6: three [H x I] GEMMs per routed slot
PEAK_FLOPS, PEAK_BYTES = 790e12, 4.8e12  # H200 bf16 dense, HBM3e
TOKENS = (1, 8, 64, 512, 4096, 16384)
ROUTINGS = ("balanced", "zipf", "router")
Step = Callable[[], object]


def routing(kind: str, num_tokens: int, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights [T, k] bf16, topk_ids [T, k])`` for ``kind`` in ``balanced`` / ``zipf`` / ``router``.

    ``balanced``: slot ``j`` of token ``t`` goes to ``(t * k + j) % E`` (equal counts). ``zipf``: k
    distinct experts drawn with probability proportional to ``1 / rank**1.2`` (the top expert gets
    about 20% of the slots). ``router``: softmax over ``x W_r^T`` with random ``W_r``, top-k, renormalised.
    """
    dev = x.device
    if kind == "router":
        w_router = torch.randn(EXPERTS, HIDDEN, device=dev, generator=gen) / HIDDEN**0.5
        probs = torch.softmax(x.float() @ w_router.T, dim=-1)
        weights, ids = probs.topk(TOP_K, dim=-1)
    else:
        if kind == "balanced":
            ids = (torch.arange(num_tokens * TOP_K, device=dev) % EXPERTS).view(num_tokens, TOP_K)
        else:
            p = 1.0 / torch.arange(1, EXPERTS + 1, device=dev, dtype=torch.float32) ** 1.2
            ids = torch.multinomial(p.expand(num_tokens, EXPERTS), TOP_K, replacement=False, generator=gen)
        weights = torch.rand(num_tokens, TOP_K, device=dev, generator=gen)
    return (weights / weights.sum(-1, keepdim=True)).bfloat16(), ids


def hf_experts(implementation: str) -> torch.nn.Module:
    """transformers' ``Qwen3VLMoeTextExperts`` at the 30B-A3B shape, bf16 on CUDA (only the experts, to fit)."""
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    config = Qwen3VLMoeTextConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
        hidden_act="silu", experts_implementation=implementation,
    )  # fmt: skip
    experts = Qwen3VLMoeTextExperts(config).to(device="cuda", dtype=torch.bfloat16)
    config._experts_implementation = implementation
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, device="cuda", generator=gen) / HIDDEN**0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, device="cuda", generator=gen) / INTER**0.5)
    return experts


def roofline_ms(num_tokens: int, ids: torch.Tensor, backward: bool) -> float:
    """Lower bound on the time: compute at peak or the bytes (touched expert weights + activations) at peak."""
    active = int(torch.unique(ids).numel())
    weight_bytes = active * 3 * HIDDEN * INTER * 2
    act_bytes = 2 * num_tokens * HIDDEN * 2
    flops = FLOP_PER_TOKEN * num_tokens * (3 if backward else 1)
    moved = (3 * weight_bytes + 3 * act_bytes) if backward else (weight_bytes + act_bytes)
    return max(flops / PEAK_FLOPS, moved / PEAK_BYTES) * 1e3


def _steps(
    experts: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, backward: bool
) -> tuple[Step, Step]:
    """(baseline step, our step) on the same weights; forward only under ``no_grad``."""
    from vl_moe.kernels import triton_moe_experts

    params = [experts.gate_up_proj, experts.down_proj]
    if not backward:

        def base() -> object:
            with torch.no_grad():
                return experts(x, ids, weights)

        def ours() -> object:
            with torch.no_grad():
                return triton_moe_experts(x, weights, ids, *params, validate_ids=False)

        return base, ours
    xg, wg = x.detach().requires_grad_(), weights.detach().requires_grad_()
    grad_y = torch.randn_like(x)

    def base_bwd() -> object:
        return torch.autograd.grad(experts(xg, ids, wg), [xg, wg, *params], grad_y)

    def ours_bwd() -> object:
        y = triton_moe_experts(xg, wg, ids, *params, validate_ids=False)
        return torch.autograd.grad(y, [xg, wg, *params], grad_y)

    return base_bwd, ours_bwd


def _sanity(experts: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
    from vl_moe.kernels import triton_moe_experts

    with torch.no_grad():
        want = experts(x, ids, weights).float()
        got = triton_moe_experts(x, weights, ids, experts.gate_up_proj, experts.down_proj).float()
    err = (got - want).abs().max().item()
    if err > 3e-2 * max(want.abs().max().item(), 1e-3):
        raise AssertionError(f"{NAME}: ours differs from transformers by {err:.3g} (max |y| {want.abs().max():.3g})")


def run(quick: bool) -> list[Row]:
    """Rows for every (tokens, routing, forward / forward+backward, baseline) (``[]`` without CUDA or Triton)."""
    if not torch.cuda.is_available():
        print(f"{NAME}: skipped, needs CUDA (the Triton CPU interpreter is not a performance path)")
        return []
    try:
        import triton  # noqa: F401

        from vl_moe.kernels import triton_moe_experts  # noqa: F401
    except ImportError as exc:
        print(f"{NAME}: skipped, {exc} (pip install vl-moe[triton])")
        return []
    device = f"cuda ({torch.cuda.get_device_name()})"
    tokens = (1, 64, 4096) if quick else TOKENS
    repeat, warmup = (5, 2) if quick else (20, 5)
    baselines = {name: hf_experts(name) for name in ("eager", "grouped_mm")}
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows: list[Row] = []
    for num_tokens in tokens:
        x = torch.randn(num_tokens, HIDDEN, device="cuda", generator=gen).bfloat16()
        for kind in ROUTINGS:
            weights, ids = routing(kind, num_tokens, x, gen)
            _sanity(baselines["grouped_mm"], x, weights, ids)
            for backward in (False, True):
                if backward and num_tokens < 64:
                    continue  # decode is inference only
                label = "forward+backward" if backward else "forward"
                bound = roofline_ms(num_tokens, ids, backward)
                flops = FLOP_PER_TOKEN * num_tokens * (3 if backward else 1)
                for base_name, experts in baselines.items():
                    base, ours = _steps(experts, x, weights, ids, backward)
                    row = compare(
                        NAME, f"{label}, T={num_tokens}, {kind} routing, 30B-A3B layer bf16",
                        baseline=f"transformers {base_name}", baseline_fn=base, ours_fn=ours,
                        device="cuda", warmup=warmup, repeat=repeat,
                    )  # fmt: skip
                    note = (
                        f"{device}; ours {flops / row.ours_ms / 1e9:.0f} TFLOP/s, "
                        f"{bound / row.ours_ms:.0%} of roofline ({bound * 1e3:.1f} us)"
                    )
                    rows.append(Row(row.benchmark, row.case, row.baseline, row.baseline_ms, row.ours_ms, "cuda", note))
                    print(f"{row.case} | vs {row.baseline}: {row.speedup:.2f}x | {note}", flush=True)
    return rows


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv[1:]):
        print(f"{r.case} | vs {r.baseline}: {r.baseline_ms:.3f} ms -> {r.ours_ms:.3f} ms ({r.speedup:.2f}x) | {r.note}")
