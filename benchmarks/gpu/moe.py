"""The MoE sections of the GPU run: the four-gradient check, the timing grid and the per-kernel profile.

Shape: one Qwen3-VL-30B-A3B MoE layer (hidden 2048, 128 experts, top-8, expert width 768, bf16);
75.5 MFLOP per token forward, three times that forward + backward. Weights are rotated over
``layers`` (>= 4) independent layers, 1.2 GB each, so no call finds its weights in L2 (50-60 MB):
a captured graph replays the calls of consecutive layers, as a model would run them. Routing:
``balanced`` (equal counts), ``zipf`` (expert ``r`` drawn with probability ~ ``1/r**1.2``) and
``router`` (softmax of ``x W_r^T`` with a random router, top-k, renormalised). Baselines:
transformers' ``Qwen3VLMoeTextExperts`` with ``eager`` and ``grouped_mm`` experts, on the same
weights, in the same process. Roofline: ``max(FLOPs / matrix rate, bytes / bandwidth)`` with the
two ceilings measured on the card, bytes = the expert weights the routing touches (read once
forward; read twice and written once as gradients forward + backward) plus the activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.gpu.timing import bench_ms

ROUTINGS = ("balanced", "zipf", "router")


@dataclass
class MoEShape:
    hidden: int = 2048
    inter: int = 768
    experts: int = 128
    top_k: int = 8
    tokens: tuple[int, ...] = (16384, 1, 4096, 64)  # the targets' sizes first, in case time runs out
    layers: int = 4
    dtype: torch.dtype = torch.bfloat16
    check_tokens: int = 4096
    profile_tokens: int = 16384
    min_backward_tokens: int = 64  # smaller batches are decoding: inference only
    rep_ms: float = 40.0

    @property
    def flop_per_token(self) -> int:
        return 2 * 3 * self.hidden * self.inter * self.top_k


@dataclass
class Layers:
    """``layers`` sets of expert weights and, per set, the two transformers baselines sharing them."""

    w_gate_up: list[torch.Tensor]
    w_down: list[torch.Tensor]
    baselines: dict[str, list[torch.nn.Module]] = field(default_factory=dict)


def make_layers(shape: MoEShape, device: str, gen: torch.Generator) -> Layers:
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    h, i, e = shape.hidden, shape.inter, shape.experts
    wgu = [
        (torch.randn(e, 2 * i, h, device=device, generator=gen) / h**0.5).to(shape.dtype) for _ in range(shape.layers)
    ]
    wd = [(torch.randn(e, h, i, device=device, generator=gen) / i**0.5).to(shape.dtype) for _ in range(shape.layers)]
    layers = Layers(wgu, wd)
    for impl in ("eager", "grouped_mm"):
        config = Qwen3VLMoeTextConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e,
                                      num_experts_per_tok=shape.top_k, hidden_act="silu")  # fmt: skip
        config._experts_implementation = impl
        modules = []
        for g, d in zip(wgu, wd):
            with torch.device("meta"):
                experts = Qwen3VLMoeTextExperts(config)
            experts.gate_up_proj = torch.nn.Parameter(g)  # the same storage as ours: no copy
            experts.down_proj = torch.nn.Parameter(d)
            modules.append(experts)
        layers.baselines[impl] = modules
    return layers


def routing(kind: str, x: torch.Tensor, shape: MoEShape, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights [T, k] in the model dtype, topk_ids [T, k])`` for ``kind`` in :data:`ROUTINGS`."""
    tokens, dev = x.shape[0], x.device
    if kind == "router":
        w_router = torch.randn(shape.experts, shape.hidden, device=dev, generator=gen) / shape.hidden**0.5
        weights, ids = torch.softmax(x.float() @ w_router.T, dim=-1).topk(shape.top_k, dim=-1)
    else:
        if kind == "balanced":
            ids = (torch.arange(tokens * shape.top_k, device=dev) % shape.experts).view(tokens, shape.top_k)
        else:
            p = 1.0 / torch.arange(1, shape.experts + 1, device=dev, dtype=torch.float32) ** 1.2
            ids = torch.multinomial(p.expand(tokens, shape.experts), shape.top_k, replacement=False, generator=gen)
        weights = torch.rand(tokens, shape.top_k, device=dev, generator=gen)
    return (weights / weights.sum(-1, keepdim=True)).to(shape.dtype), ids


def reference_experts(x, weights, ids, w_gate_up, w_down) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """float32 loop over experts, differentiable in all four inputs (the definition, for the gradient check)."""
    inter = w_down.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w_gate_up.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        gu = x[tok] @ w_gate_up[e].T
        y = (F.silu(gu[:, :inter]) * gu[:, inter:]) @ w_down[e].T
        out = out.index_add(0, tok, y * weights[tok, slot, None])
    return out


def gradient_check(shape: MoEShape, device: str, gen: torch.Generator) -> dict[str, Any]:
    """Output and the four gradients of ours (default config: the large-tile path at 4K tokens) vs float32 autograd."""
    from vl_moe.kernels import pick_config, triton_moe_experts

    t, h, i, e = shape.check_tokens, shape.hidden, shape.inter, shape.experts
    x = torch.randn(t, h, device=device, generator=gen).to(shape.dtype)
    wgu = (torch.randn(e, 2 * i, h, device=device, generator=gen) / h**0.5).to(shape.dtype)
    wd = (torch.randn(e, h, i, device=device, generator=gen) / i**0.5).to(shape.dtype)
    weights, ids = routing("router", x, shape, gen)
    weights = weights.float()
    grad_y = torch.randn(t, h, device=device, generator=gen).to(shape.dtype)
    ours_in = [v.detach().requires_grad_() for v in (x, weights, wgu, wd)]
    y = triton_moe_experts(ours_in[0], ours_in[1], ids, ours_in[2], ours_in[3])
    ours = [y, *torch.autograd.grad(y, ours_in, grad_y)]
    ref_in = [v.detach().float().requires_grad_() for v in (x, weights, wgu, wd)]
    y_ref = reference_experts(*ref_in[:2], ids, *ref_in[2:])
    want = [y_ref, *torch.autograd.grad(y_ref, ref_in, grad_y.float())]
    names = ("y", "dx", "d_topk_weights", "dw_gate_up", "dw_down")
    rel = {n: ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item() for n, a, b in zip(names, ours, want)}
    finite = all(bool(torch.isfinite(a).all()) for a in ours)
    config = pick_config(ids.numel(), e, interpret=False, train=True, hidden=h, inter=i, top_k=shape.top_k,
                         dtype=shape.dtype)  # fmt: skip
    limit = 1e-2 if shape.dtype != torch.float32 else 1e-4  # bf16 operands: 1e-3 .. 1e-2 (METHOD.md)
    ok = finite and all(v <= limit for v in rel.values())
    return {"tokens": t, "config": str(config), "relative_error": rel, "limit": limit, "finite": finite, "ok": ok}


def _steps(layers: Layers, impl: str, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
           backward: bool) -> Callable[[], object]:  # fmt: skip
    """One call per invocation, the next layer's weights each time (round robin over the layers)."""
    from vl_moe.kernels import triton_moe_experts

    turn = [0]
    grad_y = torch.randn_like(x)
    xg, wg = x.detach().requires_grad_(backward), weights.detach().requires_grad_(backward)

    def step() -> object:
        n = turn[0] % len(layers.w_gate_up)
        turn[0] += 1
        wgu, wd = layers.w_gate_up[n], layers.w_down[n]
        ctx = contextlib.nullcontext() if backward else torch.no_grad()
        with ctx:
            if impl == "ours":
                if backward:
                    wgu, wd = wgu.detach().requires_grad_(), wd.detach().requires_grad_()
                y = triton_moe_experts(xg, wg, ids, wgu, wd, validate_ids=False)
                params = [wgu, wd]
            else:
                module = layers.baselines[impl][n]
                y = module(xg, ids, wg)
                params = [module.gate_up_proj, module.down_proj]
            if backward:
                return torch.autograd.grad(y, [xg, wg, *params], grad_y)
            return y

    return step


def roofline_ms(shape: MoEShape, tokens: int, ids: torch.Tensor, backward: bool, peaks: dict[str, float]) -> float:
    active = int(torch.unique(ids).numel())
    elem = torch.finfo(shape.dtype).bits // 8
    weight_bytes = active * 3 * shape.hidden * shape.inter * elem
    act_bytes = 2 * tokens * shape.hidden * elem
    flops = shape.flop_per_token * tokens * (3 if backward else 1)
    moved = (3 * weight_bytes + 3 * act_bytes) if backward else (weight_bytes + act_bytes)
    return max(flops / (peaks["tflops"] * 1e12), moved / (peaks["tbps"] * 1e12)) * 1e3


def timing_grid(shape: MoEShape, layers: Layers, device: str, gen: torch.Generator, peaks: dict[str, float],
                time_left: Callable[[], float]) -> list[dict[str, Any]]:  # fmt: skip
    """Rows ``{tokens, routing, mode, impl, ms, method, tflops, roofline_ms}``; stops early when time runs short."""
    rows: list[dict[str, Any]] = []
    for tokens in shape.tokens:
        x = torch.randn(tokens, shape.hidden, device=device, generator=gen).to(shape.dtype)
        for kind in ROUTINGS:
            weights, ids = routing(kind, x, shape, gen)
            for backward in (False, True):
                if backward and tokens < shape.min_backward_tokens:
                    continue  # decode is inference only
                if time_left() < 20:
                    print(f"  timing grid stopped at T={tokens} {kind}: out of time")
                    return rows
                bound = roofline_ms(shape, tokens, ids, backward, peaks)
                flops = shape.flop_per_token * tokens * (3 if backward else 1)
                for impl in ("ours", "grouped_mm", "eager"):
                    # transformers' eager experts synchronise with the host (nonzero): never captured in a graph
                    ms, method = bench_ms(_steps(layers, impl, x, weights, ids, backward), device=device,
                                          rep_ms=shape.rep_ms, graph=impl != "eager")  # fmt: skip
                    row = {"tokens": tokens, "routing": kind, "mode": "fwd+bwd" if backward else "fwd", "impl": impl,
                           "ms": ms, "method": method, "tflops": flops / ms / 1e9, "roofline_ms": bound}  # fmt: skip
                    rows.append(row)
                    print(f"  T={tokens:>5} {kind:>8} {row['mode']:>7} {impl:>10}: {ms * 1e3:9.1f} us "
                          f"{row['tflops']:6.0f} TFLOP/s  roofline {bound * 1e3:8.1f} us  [{method}]", flush=True)  # fmt: skip
    return rows


def profile_table(shape: MoEShape, layers: Layers, device: str, gen: torch.Generator) -> list[dict[str, Any]]:
    """Per-kernel device time of our forward + backward at ``profile_tokens`` (router routing), largest first."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(shape.profile_tokens, shape.hidden, device=device, generator=gen).to(shape.dtype)
    weights, ids = routing("router", x, shape, gen)
    step = _steps(layers, "ours", x, weights, ids, backward=True)
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(len(layers.w_gate_up)):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0) if device == "cuda" else evt.self_cpu_time_total
        if device == "cuda" and getattr(evt, "device_type", None) is not None and "CUDA" not in str(evt.device_type):
            continue
        if us > 0 and evt.count:
            rows.append({"kernel": evt.key[:80], "calls": evt.count, "total_us": float(us)})
    rows.sort(key=lambda r: -r["total_us"])
    total = sum(r["total_us"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["total_us"] / total
    return rows[:25]
