"""The kernel variants of issue 22 against a float64 torch reference, on CPU through Triton's interpreter.

Large tiles (``block_m = 128``), grouped program order (``group_m``), expert-major weight-gradient
grids with their own tile (``block_dw``) and the two-launch decode path: the forward and all four
gradients (``x``, ``topk_weights``, ``w_gate_up``, ``w_down``) at tiny, odd shapes. Also the launch
count of the decode path, and the mapping of the grouped order (every tile exactly once).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import triton
import triton.language as tl

from vl_moe.kernels import KernelConfig, triton_moe_experts
from vl_moe.kernels._common import grouped_tile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_TOL = {torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 4e-2}


def reference(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """``y_t = sum_j w_tj * (silu(x W_g^T) * (x W_u^T)) W_d^T``, one gathered expert weight per pair."""
    inter = w_down.shape[-1]
    gu = torch.einsum("th,tkoh->tko", x, w_gate_up[ids.long()])
    h = F.silu(gu[..., :inter]) * gu[..., inter:]
    return (weights[..., None] * torch.einsum("tki,tkhi->tkh", h, w_down[ids.long()])).sum(1)


def make_inputs(
    num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """Float32 CPU ``(x, topk_weights, topk_ids, w_gate_up, w_down)`` with distinct experts per token."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    ids = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :top_k]
    weights = torch.randn(num_tokens, top_k, generator=gen).softmax(-1)
    return x, weights, ids, w_gate_up, w_down


def run_and_check(config: KernelConfig, dtype: torch.dtype, *, grads: bool, shape: tuple[int, ...], seed: int) -> None:
    """Our forward (and gradients) against float64 autograd of :func:`reference` on the same rounded inputs."""
    num_tokens, hidden, inter, num_experts, top_k = shape
    x, w, ids, wgu, wd = make_inputs(num_tokens, hidden, inter, num_experts, top_k, seed)
    grad_y = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ours_in = [x.to(DEVICE, dtype), w.to(DEVICE), wgu.to(DEVICE, dtype), wd.to(DEVICE, dtype)]
    ref_in = [t.detach().double().cpu().requires_grad_(grads) for t in ours_in]
    want = reference(ref_in[0], ref_in[1], ids, ref_in[2], ref_in[3])
    if grads:
        leaves = [t.detach().requires_grad_() for t in ours_in]
        got = triton_moe_experts(leaves[0], leaves[1], ids.to(DEVICE), leaves[2], leaves[3], config=config)
        ours = [got, *torch.autograd.grad(got, leaves, grad_y.to(DEVICE))]
        wanted = [want, *torch.autograd.grad(want, ref_in, grad_y.double())]
        names = ("y", "dx", "dtopk_weights", "dw_gate_up", "dw_down")
    else:
        with torch.no_grad():
            ours = [triton_moe_experts(*ours_in[:2], ids.to(DEVICE), *ours_in[2:], config=config)]
        wanted, names = [want.detach()], ("y",)
    for name, got_t, ref_t in zip(names, ours, wanted):
        assert got_t.shape == ref_t.shape, name
        err = (got_t.double().cpu() - ref_t).abs().max().item()
        scale = max(ref_t.abs().max().item(), 1e-3)
        assert err <= REL_TOL[dtype] * scale, f"{name}: max error {err:.3g} > {REL_TOL[dtype]:g} * {scale:.3g}"


LARGE_TILES = KernelConfig(block_m=128, block_n=32, block_k=32, group_m=8, block_dw=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("num_tokens", "top_k", "num_experts"), [(70, 2, 3), (5, 2, 4)])
def test_large_tiles_forward_and_all_gradients(
    num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype
) -> None:
    """``block_m = 128`` with ``H = 40``, ``I = 24`` (masked tiles): experts with more and fewer than 128 rows."""
    run_and_check(LARGE_TILES, dtype, grads=True, shape=(num_tokens, 40, 24, num_experts, top_k), seed=num_tokens)


@pytest.mark.parametrize("group_m", [1, 3, 8])
def test_grouped_order_forward_and_all_gradients(group_m: int) -> None:
    """Row blocks of 16 over several column tiles (``H = 72``, ``I = 48``, 16-wide tiles): partial last group."""
    config = KernelConfig(block_m=16, block_n=16, block_k=16, group_m=group_m, block_dw=32)
    run_and_check(config, torch.float32, grads=True, shape=(23, 72, 48, 5, 2), seed=group_m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("num_tokens", "top_k", "num_experts"), [(1, 2, 4), (3, 3, 5), (8, 1, 4)])
def test_decode_path_forward(num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype) -> None:
    config = KernelConfig(block_m=16, block_n=16, block_k=16, decode=True)
    run_and_check(config, dtype, grads=False, shape=(num_tokens, 40, 24, num_experts, top_k), seed=num_tokens)


def test_decode_config_with_gradients_takes_the_sorted_path() -> None:
    """``decode=True`` is an inference path: with gradients wanted the sorted path runs (and is right)."""
    config = KernelConfig(block_m=16, block_n=16, block_k=16, decode=True)
    run_and_check(config, torch.float32, grads=True, shape=(3, 40, 24, 4, 2), seed=5)


def test_decode_path_strided_inputs_no_tokens_and_duplicate_experts() -> None:
    config = KernelConfig(block_m=16, block_n=16, block_k=32, decode=True)
    x, w, ids, wgu, wd = make_inputs(4, 32, 16, 4, 2, seed=3)
    ids = torch.tensor([[1, 1], [0, 3], [3, 3], [2, 0]])  # one expert twice in a token: both slots count
    x_wide = torch.cat([x, torch.randn_like(x)], dim=1)[:, :32]
    wgu_t = wgu.transpose(1, 2).contiguous().transpose(1, 2)  # [E, 2I, H] view of a [E, H, 2I] tensor
    with torch.no_grad():
        y = triton_moe_experts(
            x_wide.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), wgu_t.to(DEVICE), wd.to(DEVICE), config=config
        )
        empty = triton_moe_experts(x[:0].to(DEVICE), w[:0].to(DEVICE), ids[:0].to(DEVICE), wgu.to(DEVICE), wd.to(DEVICE), config=config)  # fmt: skip
    want = reference(x.double(), w.double(), ids, wgu.double(), wd.double())
    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-5)
    assert empty.shape == (0, 32)


class _LaunchCounter:
    """Counts Triton launches and the torch ops that would launch a device kernel (allocations and views excluded)."""

    FREE = ("empty", "empty_strided", "view", "_unsafe_view", "reshape", "as_strided", "detach", "alias", "t",
            "transpose", "expand", "slice", "select", "unsqueeze", "squeeze", "permute", "_to_copy_noop")  # fmt: skip

    def __init__(self) -> None:
        self.triton: list[str] = []
        self.torch: list[str] = []


def count_launches(monkeypatch: pytest.MonkeyPatch, fn) -> _LaunchCounter:  # type: ignore[no-untyped-def]
    from torch.utils._python_dispatch import TorchDispatchMode

    counter = _LaunchCounter()
    inside_triton = [False]
    original = triton.runtime.jit.KernelInterface.__getitem__

    def getitem(kernel, grid):  # type: ignore[no-untyped-def]
        launch = original(kernel, grid)

        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            counter.triton.append(getattr(kernel, "__name__", str(kernel)))
            inside_triton[0] = True  # the interpreter's own tensor copies are not launches
            try:
                return launch(*args, **kwargs)
            finally:
                inside_triton[0] = False

        return run

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func.overloadpacket.__name__
            if not inside_triton[0] and name not in _LaunchCounter.FREE:
                counter.torch.append(name)
            return func(*args, **(kwargs or {}))

    with monkeypatch.context() as patch:
        patch.setattr(triton.runtime.jit.KernelInterface, "__getitem__", getitem)
        with Ops(), torch.no_grad():
            fn()
    return counter


def test_decode_path_runs_two_launches_instead_of_seven(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, ids, wgu, wd = (t.to(DEVICE) for t in make_inputs(1, 32, 16, 8, 4, seed=0))
    sorted_path = KernelConfig(block_m=16, block_n=16, block_k=16)
    decode_path = KernelConfig(block_m=16, block_n=16, block_k=16, decode=True)
    before = count_launches(
        monkeypatch, lambda: triton_moe_experts(x, w, ids, wgu, wd, config=sorted_path, validate_ids=False)
    )
    after = count_launches(
        monkeypatch, lambda: triton_moe_experts(x, w, ids, wgu, wd, config=decode_path, validate_ids=False)
    )
    # sorted: fill of the sorted ids, histogram, offsets, scatter, GEMM 1, GEMM 2, combine
    assert len(before.triton) + len(before.torch) == 7, (before.triton, before.torch)
    assert after.triton == ["decode_gate_up_kernel", "decode_down_combine_kernel"] and after.torch == []


@triton.jit
def _grouped_order_probe(out_ptr, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):  # type: ignore[no-untyped-def]
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@pytest.mark.parametrize(("num_pid_m", "num_pid_n", "group_m"), [(7, 3, 2), (5, 4, 8), (6, 1, 4), (9, 5, 1)])
def test_grouped_order_visits_every_tile_once(num_pid_m: int, num_pid_n: int, group_m: int) -> None:
    from vl_moe.kernels import _common

    if not _common.INTERPRET and DEVICE == "cpu":
        pytest.skip("needs CUDA or Triton's interpreter")
    out = torch.full((num_pid_m * num_pid_n, 2), -1, dtype=torch.int32, device=DEVICE)
    _grouped_order_probe[(num_pid_m * num_pid_n,)](out, num_pid_m, num_pid_n, GROUP_M=group_m)
    tiles = [tuple(r) for r in out.cpu().tolist()]
    assert sorted(tiles) == [(m, n) for m in range(num_pid_m) for n in range(num_pid_n)]
    # Within a group, the row block changes fastest: the first min(group_m, M) programs share column tile 0.
    first = tiles[: min(group_m, num_pid_m)]
    assert [n for _, n in first] == [0] * len(first) and [m for m, _ in first] == list(range(len(first)))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 8])
def test_gpu_decode_path_30b_shape_two_kernels(num_tokens: int) -> None:
    """Decode at the 30B-A3B shape (bf16): the rule picks the decode path, two CUDA kernels, right output."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    t, h, i, e, k = num_tokens, 2048, 768, 128, 8
    x = torch.randn(t, h, device="cuda", generator=gen).bfloat16()
    wgu = (torch.randn(e, 2 * i, h, device="cuda", generator=gen) / h**0.5).bfloat16()
    wd = (torch.randn(e, h, i, device="cuda", generator=gen) / i**0.5).bfloat16()
    weights, ids = torch.randn(t, e, device="cuda", generator=gen).softmax(-1).topk(k, dim=-1)
    with torch.no_grad():
        triton_moe_experts(x, weights, ids, wgu, wd, validate_ids=False)  # compile outside the profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            y = triton_moe_experts(x, weights, ids, wgu, wd, validate_ids=False)
            torch.cuda.synchronize()
    kernels = [evt.name for evt in prof.events() if "CUDA" in str(getattr(evt, "device_type", ""))]
    assert len(kernels) == 2 and all(name.startswith("decode_") for name in kernels), kernels
    want = reference(x.double(), weights.double(), ids, wgu.double(), wd.double())
    assert ((y.double() - want).norm() / want.norm()).item() <= 1e-2
