"""policy_loss's performance contract (issue 7): no [B, T] float64 intermediates, few [B, T] buffers.

Every op that runs during forward and backward is recorded with a TorchDispatchMode, so these
tests see intermediates that never leave the function.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vl_rl.losses import policy_loss

METHODS = ["grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "sapo", "cispo"]
B, T = 5, 23  # shapes no other tensor here has


class _Recorder(TorchDispatchMode):
    """Records (op name, dtype, shape) of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, tuple(t.shape)))
        return out


def _inputs(dtype: torch.dtype, per_token: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    lp = (-3 * torch.rand(B, T, generator=gen)).to(dtype)
    old = lp.float() + 0.3 * torch.randn(B, T, generator=gen)
    ref = lp.float() + 0.2 * torch.randn(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    adv = torch.randn((B, T) if per_token else (B,), generator=gen)
    lp[~mask] = float("nan")
    old[~mask] = float("inf")
    return lp, old.to(dtype), adv, mask, ref.to(dtype)


def _run(method: str, dtype: torch.dtype, per_token: bool, **kw: Any) -> _Recorder:
    lp, old, adv, mask, ref = _inputs(dtype, per_token)
    leaf = lp.clone().requires_grad_(True)
    rec = _Recorder()
    with rec:
        loss, _ = policy_loss(leaf, old, adv, mask, method=method, ref_logprobs=ref, entropy=lp.float(), **kw)  # type: ignore[arg-type]
        (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    return rec


def _cases() -> list[tuple[str, bool]]:
    return [(m, p) for m in METHODS for p in (False, True) if not (m == "gspo" and p)]


@pytest.mark.parametrize(("method", "per_token"), _cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_no_float64_token_tensor(method: str, per_token: bool, dtype: torch.dtype, kl_coef: float) -> None:
    rec = _run(method, dtype, per_token, kl_coef=kl_coef)
    token_sized = [(op, dt) for op, dt, shape in rec.outputs if shape == (B, T)]
    assert token_sized, "the recorder saw no [B, T] op: it is not recording"
    wide = [(op, dt) for op, dt in token_sized if dt in (torch.float64, torch.int64, torch.complex128)]
    assert not wide, f"[B, T] 8-byte intermediates: {wide}"


def test_recorder_catches_a_float64_token_tensor() -> None:
    """The check above can fail: a float64 [B, T] intermediate is seen."""
    rec = _Recorder()
    with rec:
        torch.zeros(B, T).double().sum()
    assert (torch.float64, (B, T)) in [(dt, shape) for _, dt, shape in rec.outputs]


@pytest.mark.parametrize(("method", "per_token"), _cases())
def test_no_where_or_masked_fill_on_token_tensors(method: str, per_token: bool) -> None:
    """Bool-mask selection ops are ~10x slower than float arithmetic on CPU; the mask is applied bitwise."""
    rec = _run(method, torch.float32, per_token, kl_coef=0.1)
    slow = [op for op, _, shape in rec.outputs if shape == (B, T) and ("where" in op or "masked_fill" in op)]
    assert not slow, slow


def test_second_backward_is_refused() -> None:
    lp, old, adv, mask, _ = _inputs(torch.float32, per_token=False)
    leaf = torch.nan_to_num(lp).requires_grad_(True)
    loss, _ = policy_loss(leaf, old, adv, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()
