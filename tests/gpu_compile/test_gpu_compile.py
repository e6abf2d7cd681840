"""Every Triton kernel of vl-moe and vl-rope compiles for sm_90 (and sm_100) without register spills.

No GPU is needed: ``_compile_worker.py`` (run once per session in a subprocess, with
``TRITON_INTERPRET=0``) drives the packages' real launch code on ``meta`` tensors, records each
kernel specialisation it would launch (every tile config of the rule, the decode path, inference
and training, bf16 / fp16 / fp32, unaligned widths, the rotary kernel's layouts, the entries of any
shipped tuned table), compiles each with Triton's own compiler and the ``ptxas`` in Triton's
wheel for a fixed ``GPUTarget``, and reads ptxas' register and spill report and the kernel's
dynamic shared memory. A spill, a stack frame, shared memory over the architecture's limit or
more registers than the register file holds fails the test, naming the kernel, its constexprs
and the scenario that launches it. Two toy kernels check the detector itself.

Marked ``gpu_compile``; runs in the default session (``nox -s tests``). Skips only if ptxas cannot
run. Triton's on-disk cache (and the ptxas reports kept beside it) make a second run take about 15 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="this Triton has no CUDA backend")

pytestmark = pytest.mark.gpu_compile

WORKER = Path(__file__).resolve().parent / "_compile_worker.py"
REGISTER_FILE = 65_536  # 32-bit registers per SM on sm_90 and sm_100: one block must fit


def problems(record: dict[str, Any]) -> list[str]:
    """What would make this compiled kernel slow or unlaunchable on its architecture (empty: fine)."""
    if "error" in record:
        return [f"does not compile: {record['error']}"]
    found = []
    if record["spill_stores"] or record["spill_loads"]:
        found.append(f"spills registers ({record['spill_stores']} B stored, {record['spill_loads']} B loaded)")
    elif record["stack_frame"]:
        found.append(f"uses a {record['stack_frame']} B stack frame (local memory)")
    if record["shared"] > record["shared_limit"]:
        found.append(
            f"needs {record['shared']} B of shared memory, over sm_{record['arch']}'s {record['shared_limit']} B"
        )
    if record["registers"] * record["threads"] > REGISTER_FILE:
        found.append(f"{record['registers']} registers x {record['threads']} threads exceed the register file")
    return found


def describe(record: dict[str, Any]) -> str:
    blocks = {k: v for k, v in record["constexprs"].items() if k.startswith(("BLOCK", "GROUP", "STORE", "E_BLOCK"))}
    return (
        f"{record['module']}.{record['kernel']} sm_{record['arch']} num_warps={record['num_warps']} "
        f"num_stages={record['num_stages']} {blocks} [{record['scenario']}]"
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu_compile") / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--out", str(out)], env=env, capture_output=True, text=True, timeout=1200
    )
    if proc.returncode != 0:
        pytest.fail(f"{WORKER.name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    data: dict[str, Any] = json.loads(out.read_text())
    if "skip" in data:
        pytest.skip(data["skip"])
    return data


def records(report: dict[str, Any], arch: int, *, toys: bool = False) -> list[dict[str, Any]]:
    return [r for r in report["records"] if r["arch"] == arch and (r["scenario"] == "toy") == toys]


def test_detector_sees_register_spills(report: dict[str, Any]) -> None:
    (hog,) = [r for r in records(report, 90, toys=True) if r["kernel"] == "toy_register_hog"]
    assert any("spills registers" in p for p in problems(hog)), (hog, problems(hog))


def test_detector_sees_shared_memory_over_the_limit(report: dict[str, Any]) -> None:
    (hog,) = [r for r in records(report, 90, toys=True) if r["kernel"] == "toy_shared_hog"]
    assert any("shared memory" in p for p in problems(hog)), (hog, problems(hog))


@pytest.mark.parametrize("arch", [90, 100])
def test_kernels_compile_without_spills(report: dict[str, Any], arch: int) -> None:
    compiled = records(report, arch)
    if not compiled:
        pytest.skip(f"this Triton compiled nothing for sm_{arch}")
    failures = [f"{describe(r)}: {'; '.join(p)}" for r in compiled if (p := problems(r))]
    assert not failures, f"{len(failures)} of {len(compiled)} kernel variants fail:\n" + "\n".join(failures)


@pytest.mark.parametrize("arch", [90, 100])
def test_every_launched_kernel_is_covered(report: dict[str, Any], arch: int) -> None:
    """Each kernel of the packages' kernel modules was compiled at least once (no kernel escapes the check)."""
    from vl_moe.kernels import _align_kernels, _backward_kernels, _decode_kernels, _forward_kernels

    wanted = {
        f"{module.__name__}.{name}"
        for module in (_align_kernels, _forward_kernels, _backward_kernels, _decode_kernels)
        for name in module.__all__
    }
    if _has_rope():
        wanted.add("vl_rope._triton_rotary_kernel.rotary_kernel")
    compiled = {f"{r['module']}.{r['kernel']}" for r in records(report, arch)}
    assert not wanted - compiled, f"never compiled for sm_{arch}: {sorted(wanted - compiled)}"


def test_large_tiles_use_hopper_tensor_core_instructions(report: dict[str, Any]) -> None:
    """On sm_90 the 128-row tiles of the grouped GEMMs compile to wgmma (not the older mma.sync path), bf16 Qwen shapes."""
    large = [r for r in records(report, 90) if r["constexprs"].get("BLOCK_M") == "128" and "error" not in r]
    gemms = {r["kernel"] for r in large if r["kernel"].startswith(("gemm", "dh_", "dx_", "dw_"))}
    assert gemms >= {"gemm1_swiglu_kernel", "gemm2_scatter_kernel", "dh_swiglu_kernel", "dx_scatter_kernel"}, gemms
    bf16 = [r for r in large if r["kernel"] in gemms and "bfloat16" in r["scenario"] and "A3B" in r["scenario"]]
    assert bf16 and all(r["wgmma"] for r in bf16), [describe(r) for r in bf16 if not r["wgmma"]]


def _has_rope() -> bool:
    try:
        import vl_rope.triton_rotary  # noqa: F401
    except ImportError:
        return False
    return True
