"""The kernels' harness: the device guard in the launch code, no numpy outside the interpreter, one id check.

- The compiled kernels (``TRITON_INTERPRET=0``) import and refuse CPU tensors with a clear
  :class:`ValueError` from every entry point, with numpy made unimportable (numpy is not a
  dependency of vl-moe; only Triton's interpreter needs it).
- Mixed devices and unsupported devices are refused by the launch code itself, not only by the
  public function.
- ``moe_experts(..., backend="triton")`` range-checks the ids once (or not at all with
  ``check_ids=False``), never a second time inside the kernels' entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from vl_moe import moe_experts
from vl_moe.kernels import KernelConfig, align_tokens, function

NO_INTERPRETER = textwrap.dedent(
    """
    import json, sys
    sys.modules["numpy"] = None  # `import numpy` raises ImportError from here on
    import torch
    from vl_moe.kernels import _common, _launch, align_tokens, triton_moe_experts
    from vl_moe import SparseMoeBlock
    found = {"interpret": _common.INTERPRET, "interpreter_loaded": "triton.runtime.interpreter" in sys.modules}
    x, w, ids = torch.randn(3, 32), torch.rand(3, 2), torch.tensor([[0, 1], [1, 2], [2, 3]])
    wgu, wd = torch.randn(4, 32, 32), torch.randn(4, 32, 16)
    for name, call in {
        "align_tokens": lambda: align_tokens(ids, 4, 16),
        "triton_moe_experts": lambda: triton_moe_experts(x, w, ids, wgu, wd),
        "decode_forward": lambda: _launch.decode_forward(x, w.flatten(), ids.flatten(), wgu, wd, None),
        "block_triton": lambda: SparseMoeBlock(32, 16, 4, 2, backend="triton")(x[None]),
    }.items():
        try:
            call()
            found[name] = "no error"
        except Exception as err:
            found[name] = f"{type(err).__name__}: {err}"
    print(json.dumps(found))
    """
)


def test_compiled_kernels_need_no_numpy_and_refuse_cpu_tensors_clearly() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", NO_INTERPRETER], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["interpret"] is False and found["interpreter_loaded"] is False
    for name in ("align_tokens", "triton_moe_experts", "decode_forward", "block_triton"):
        assert found[name].startswith("ValueError: ") and "TRITON_INTERPRET=1" in found[name], (name, found[name])
    assert found["align_tokens"].startswith("ValueError: align_tokens: CPU tensors need Triton's interpreter")


def test_launch_code_refuses_mixed_and_unsupported_devices() -> None:
    from vl_moe.kernels import _launch

    config = KernelConfig(block_m=16, block_n=16, block_k=16, decode=True)
    x, w = torch.randn(2, 32), torch.rand(4)
    ids = torch.tensor([0, 1, 1, 2])
    wgu, wd = torch.randn(4, 32, 32), torch.randn(4, 32, 16)
    with pytest.raises(ValueError, match=r"one device, got \['cpu', 'meta'\]"):
        _launch.decode_forward(x, w, ids, wgu.to("meta"), wd, config)
    with pytest.raises(ValueError, match=r"run on CUDA tensors .* got meta"):
        align_tokens(ids.view(2, 2).to("meta"), 4, 16)


def test_dry_run_accepts_meta_tensors_and_launches_nothing_real(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compile check's recorder: under ``dry_run`` meta tensors pass the guard (kernels recorded, not run)."""
    import triton

    from vl_moe.kernels import _common

    launched: list[str] = []
    monkeypatch.setattr(
        triton.runtime.jit.KernelInterface,
        "__getitem__",
        lambda kernel, grid: lambda *a, **k: launched.append(kernel.__name__),
    )
    with _common.dry_run():
        align = align_tokens(torch.zeros(3, 2, dtype=torch.int64, device="meta"), 4, 16, validate=False)
    assert align.sorted_ids.device.type == "meta"
    assert launched == ["histogram_kernel", "offsets_kernel", "scatter_kernel"]


def test_moe_experts_checks_ids_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from vl_moe.kernels import _common

    if not torch.cuda.is_available() and not _common.INTERPRET:
        pytest.skip("needs CUDA or Triton's interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checked: list[int] = []
    original = function.check_topk_ids
    monkeypatch.setattr(function, "check_topk_ids", lambda ids, e: (checked.append(ids.numel()), original(ids, e)))
    x, wgu, wd = torch.randn(3, 32, device=device), torch.randn(4, 32, 32, device=device), torch.randn(4, 32, 16, device=device)  # fmt: skip
    w, ids = torch.rand(3, 2, device=device), torch.tensor([[0, 1], [1, 2], [2, 3]], device=device)
    for check_ids in (True, False):
        moe_experts(x, w, ids, wgu, wd, backend="triton", check_ids=check_ids)
    assert [n for n in checked if n] == [], checked  # the kernels' entry point left the range to moe_experts
