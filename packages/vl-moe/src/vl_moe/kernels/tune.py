"""Sweep the Triton MoE kernels' tile configs on the GPU at hand and write a tuned table (vLLM's approach).

Usage (on the GPU the table is for)::

    python -m vl_moe.kernels.tune --experts 128 --hidden 2048 --inter 768 --top-k 8 --dtype bfloat16 \\
        --tokens 1 8 64 512 4096 16384 --out packages/vl-moe/src/vl_moe/kernels/configs

For each token count: random router-like routing (softmax of random logits, top-k, renormalised),
every candidate config checked against the rule's output first (a candidate that fails to
compile, runs out of resources or disagrees is dropped), then timed with
``triton.testing.do_bench`` (median; L2 flushed between runs). The objective is the forward
alone for inference-sized batches (``--objective auto``: up to 256 tokens; the decode path is a
candidate there) and forward + backward above, where training dominates. The fastest candidate
per token count goes into ``table_name(...)`` under ``--out`` (merged into an existing table of
that name: other token counts are kept), with the rule's time and the versions in ``meta``;
:func:`vl_moe.kernels.table.lookup` then serves it.

``--device cpu`` runs the same loop on tiny shapes under Triton's interpreter (``TRITON_INTERPRET=1``),
timed by the wall clock: a test path for the script itself, not a way to tune.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vl_moe.kernels.config import DECODE_MAX_PAIRS, KernelConfig
from vl_moe.kernels.table import pick_config, read_table, table_name, write_table

__all__ = ["candidates", "main", "tune"]

TRAIN_FROM_TOKENS = 256
"""``--objective auto``: forward + backward from this many tokens, forward only below."""


def candidates(num_pairs: int, num_experts: int, *, train: bool, interpret: bool) -> list[KernelConfig]:
    """The search space for one routing size (pruned: no row block much larger than an expert's rows)."""
    if interpret:  # the interpreter runs every program in Python: a few small configs exercise the loop
        base = KernelConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1)
        found = [base, KernelConfig(block_m=32, block_n=16, block_k=16, num_warps=1, num_stages=1, group_m=1)]
        return found if train else [*found, KernelConfig(block_m=16, block_n=16, block_k=32, decode=True)]
    rows = num_pairs / max(num_experts, 1)
    block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * rows)]
    found = []
    for bm, bn, bk, gm, warps, stages in itertools.product(block_ms, (32, 64, 128), (32, 64, 128), (1, 8, 16),
                                                           (4, 8), (2, 3, 4)):  # fmt: skip
        for dw in (64, 128) if train else (None,):
            found.append(KernelConfig(block_m=bm, block_n=bn, block_k=bk, group_m=gm, num_warps=warps,
                                      num_stages=stages, block_dw=dw))  # fmt: skip
    if not train and num_pairs <= 4 * DECODE_MAX_PAIRS:
        for bn, bk, warps, stages in itertools.product((16, 32, 64), (64, 128, 256), (2, 4, 8), (2, 3, 4)):
            found.append(KernelConfig(block_m=16, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                                      decode=True))  # fmt: skip
    return found


def _inputs(num_tokens: int, args: argparse.Namespace, device: str, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    dtype = getattr(torch, args.dtype)
    h, i, e = args.hidden, args.inter, args.experts
    x = torch.randn(num_tokens, h, device=device, generator=gen).to(dtype)
    w_gate_up = (torch.randn(e, 2 * i, h, device=device, generator=gen) / h**0.5).to(dtype)
    w_down = (torch.randn(e, h, i, device=device, generator=gen) / i**0.5).to(dtype)
    probs = torch.randn(num_tokens, e, device=device, generator=gen).softmax(-1)
    weights, ids = probs.topk(args.top_k, dim=-1)
    grad_y = torch.randn(num_tokens, h, device=device, generator=gen).to(dtype)
    return x, weights / weights.sum(-1, keepdim=True), ids, w_gate_up, w_down, grad_y


def _step(inputs: tuple[torch.Tensor, ...], config: KernelConfig, train: bool) -> Callable[[], torch.Tensor]:
    from vl_moe.kernels import triton_moe_experts

    x, weights, ids, w_gate_up, w_down, grad_y = inputs
    if not train:

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return triton_moe_experts(x, weights, ids, w_gate_up, w_down, config=config, validate_ids=False)

        return forward
    leaves = [t.detach().requires_grad_() for t in (x, weights, w_gate_up, w_down)]

    def forward_backward() -> torch.Tensor:
        y = triton_moe_experts(leaves[0], leaves[1], ids, leaves[2], leaves[3], config=config, validate_ids=False)
        grads = torch.autograd.grad(y, leaves, grad_y)
        return torch.cat([y.flatten().float(), grads[0].flatten().float()])

    return forward_backward


def _time_ms(fn: Callable[[], object], device: str, budget_ms: float) -> float:
    if device == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(5.0, budget_ms / 4), rep=budget_ms, return_mode="median"))


def tune(args: argparse.Namespace, log: Callable[[str], None] = print) -> Path:
    """Run the sweep described by ``args`` (see :func:`main`) and write the table; returns its path."""
    from vl_moe.kernels import _common

    device = args.device
    interpret = _common.INTERPRET
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tune: --device cuda needs a CUDA GPU (use --device cpu with TRITON_INTERPRET=1 to test)")
    if device == "cpu" and not interpret:
        raise SystemExit("tune: --device cpu needs Triton's interpreter: set TRITON_INTERPRET=1")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    dtype = getattr(torch, args.dtype)
    rng = random.Random(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    table: dict[int, KernelConfig] = {}
    timings: dict[str, dict[str, float]] = {}
    for num_tokens in args.tokens:
        train = args.objective == "train" or (args.objective == "auto" and num_tokens >= TRAIN_FROM_TOKENS)
        pairs = num_tokens * args.top_k
        inputs = _inputs(num_tokens, args, device, gen)
        rule = pick_config(pairs, args.experts, interpret=interpret, train=train, hidden=args.hidden,
                           inter=args.inter, top_k=args.top_k, dtype=dtype)  # fmt: skip
        want = _step(inputs, rule, train)().float()
        space = [c for c in candidates(pairs, args.experts, train=train, interpret=interpret) if c != rule]
        space = [rule, *rng.sample(space, min(len(space), max(args.max_candidates - 1, 0)))]
        best: tuple[float, KernelConfig] | None = None
        rule_ms = float("nan")
        for config in space:
            try:
                step = _step(inputs, config, train)
                got = step().float()
                if not torch.allclose(got, want, rtol=args.rtol, atol=args.rtol * want.abs().max().item()):
                    log(f"T={num_tokens}: {config} disagrees with the rule's output; dropped")
                    continue
                ms = _time_ms(step, device, args.rep_ms)
            except Exception as err:  # out of resources, compile failure: not a candidate on this GPU
                log(f"T={num_tokens}: {config} failed ({type(err).__name__}: {str(err)[:120]}); dropped")
                continue
            if config == rule:
                rule_ms = ms
            if best is None or ms < best[0]:
                best = (ms, config)
        if best is None:
            raise SystemExit(f"tune: no candidate ran at T={num_tokens} (not even the rule's config)")
        table[num_tokens] = best[1]
        timings[str(num_tokens)] = {"best_ms": round(best[0], 4), "rule_ms": round(rule_ms, 4)}
        mode = "forward+backward" if train else "forward"
        log(f"T={num_tokens} ({mode}): best {best[0]:.4f} ms vs rule {rule_ms:.4f} ms with {best[1]}")
    path = Path(args.out) / table_name(device_name, args.experts, args.hidden, args.inter, args.top_k, dtype)
    if path.is_file():  # sweeps of other token counts (e.g. from an earlier, shorter lease) are kept
        old_timings = json.loads(path.read_text(encoding="utf-8")).get("meta", {}).get("timings", {})
        table = {**read_table(path), **table}
        timings = {**old_timings, **timings}
    import triton

    meta = {
        "device": device_name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "objective": f"{args.objective} (forward below {TRAIN_FROM_TOKENS} tokens, forward+backward from there)",
        "candidates_per_size": args.max_candidates,
        "timings": timings,
    }
    write_table(path, table, meta)
    log(f"wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (``python -m vl_moe.kernels.tune --help``)."""
    parser = argparse.ArgumentParser(prog="python -m vl_moe.kernels.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096, 16384])
    parser.add_argument("--objective", choices=("auto", "forward", "train"), default="auto")
    parser.add_argument("--max-candidates", type=int, default=64, help="configs timed per token count (rule included)")
    parser.add_argument("--rep-ms", type=float, default=40.0, help="do_bench time per candidate (ms)")
    parser.add_argument("--rtol", type=float, default=3e-2, help="agreement with the rule's output")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("."))
    tune(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
