"""Compile every Triton kernel specialisation of vl-moe and vl-rope for sm_90 / sm_100 without a GPU.

``python _compile_worker.py --out results.json [--arch 90 --arch 100] [--workers 2]`` (run by
``test_gpu_compile.py`` in a subprocess with ``TRITON_INTERPRET=0``: the test session itself runs
the kernels in Triton's interpreter, whose functions cannot be compiled).

How: Triton's launcher (``KernelInterface.__getitem__``) is replaced by a recorder, as Triton's own
compile warm-up does, and the packages' real launch code runs on ``meta`` tensors (shapes and
dtypes, no memory) for a set of scenarios: every layer shape, token count, dtype and mode
(inference, training) that selects a different tile config or code path. Each recorded launch is
specialised exactly as ``JITFunction.run`` would on a GPU (argument types, 16-byte divisibility,
constexprs, ``num_warps``/``num_stages``) but for a fixed ``GPUTarget``, deduplicated, compiled with
``triton.compile`` (Triton's MLIR pipeline and the ``ptxas`` shipped in its wheel), whose ``ptxas -v``
report (registers, spill stores/loads, stack frame) is read and kept beside Triton's cache (keyed
by the kernel's hash) for the next run's cache hits.
Dynamic shared memory comes from the compiled metadata. Two toy kernels, one register-hungry and
one with too much shared memory, check that the detector sees both faults.

Output: a JSON object ``{"records": [...], "errors": [...], "seconds": s}``, one record per
(kernel specialisation, arch).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", category=UserWarning)  # Triton 3.9's FP-fusion default notice

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, KernelInterface, create_function_from_signature  # noqa: E402

# Opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): 227 KiB on sm_90 and sm_100.
SHARED_LIMIT = {90: 232_448, 100: 232_448}
REGISTERS_PER_SM = 65_536
PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")

Launch = tuple[JITFunction, tuple[Any, ...], dict[str, Any], str, tuple[int, ...]]


@contextmanager
def recording(launches: list[Launch], scenario: list[Any]) -> Iterator[None]:
    """Record ``kernel[grid](*args, **kwargs)`` instead of launching it, tagged ``(label, archs)`` from ``scenario``."""
    original = KernelInterface.__getitem__

    def getitem(kernel: JITFunction, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: launches.append((kernel, args, kwargs, scenario[0], tuple(scenario[1])))

    KernelInterface.__getitem__ = getitem  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original  # type: ignore[method-assign]


def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


# --------------------------------------------------------------------------- scenarios


MOE_SHAPES = {  # name: (H, I, E, k)
    "30B-A3B": (2048, 768, 128, 8),
    "235B-A22B": (4096, 1536, 128, 8),
    "odd": (1000, 360, 60, 4),  # widths that are no multiple of 16: the unaligned specialisations
}


def moe_scenarios() -> Iterator[tuple[str, tuple[int, int, int, int], int, torch.dtype, bool, Any, tuple[int, ...]]]:
    """``(label, (H, I, E, k), T, dtype, train, config, archs)``: every rule bucket and path, plus shipped tables.

    bfloat16 (the production dtype) is compiled for sm_90 and sm_100; float32, float16 and unaligned
    widths for sm_90 only, to keep the check fast.
    """
    from vl_moe.kernels.table import CONFIG_DIR, read_table

    both, hopper = (90, 100), (90,)
    # Token counts that hit each rule bucket at E=128, k=8: decode, 16-, 32-, 64- and 128-row blocks.
    for name in ("30B-A3B", "235B-A22B"):
        yield name, MOE_SHAPES[name], 1, torch.bfloat16, False, None, both
        for tokens in (8, 512, 1536, 4096):
            for train in (False, True):
                yield name, MOE_SHAPES[name], tokens, torch.bfloat16, train, None, both
    for tokens, train in ((1, False), (64, True), (4096, True)):
        yield "30B-A3B", MOE_SHAPES["30B-A3B"], tokens, torch.float32, train, None, hopper
    yield "30B-A3B", MOE_SHAPES["30B-A3B"], 4096, torch.float16, True, None, hopper
    for tokens, train in ((3, False), (3, True), (2000, True)):
        yield "odd", MOE_SHAPES["odd"], tokens, torch.bfloat16, train, None, hopper
    # Every entry of every tuned table shipped in the package, at its own shape.
    pattern = re.compile(r"E=(\d+),H=(\d+),I=(\d+),k=(\d+),dtype=(\w+),device=.*\.json")
    for path in sorted(CONFIG_DIR.glob("*.json")):
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        e, h, i, k = (int(v) for v in match.groups()[:4])
        dtype = getattr(torch, match.group(5))
        for tokens, config in read_table(path).items():
            for train in (False, True):
                yield f"table {path.name}", (h, i, e, k), tokens, dtype, train, config, both


def record_moe(launches: list[Launch]) -> None:
    from vl_moe.kernels import _common, triton_moe_experts

    scenario: list[Any] = ["", ()]
    with recording(launches, scenario), _common.dry_run():
        for label, (h, i, e, k), tokens, dtype, train, config, archs in moe_scenarios():
            mode = "train" if train else "infer"
            scenario[:] = [f"vl_moe {label} T={tokens} {str(dtype).removeprefix('torch.')} {mode}", archs]
            x, weights = meta(tokens, h, dtype=dtype), meta(tokens, k, dtype=torch.float32)
            wgu, wd = meta(e, 2 * i, h, dtype=dtype), meta(e, h, i, dtype=dtype)
            ids = meta(tokens, k, dtype=torch.int64)
            leaves = (x, weights, wgu, wd)
            with torch.set_grad_enabled(train):
                for t in leaves:
                    t.requires_grad_(train)
                y = triton_moe_experts(x, weights, ids, wgu, wd, config=config, validate_ids=False)
                if train:
                    torch.autograd.grad(y, leaves, torch.empty_like(y))


def record_rope(launches: list[Launch]) -> None:
    """The fused rotary kernel for the Qwen3-VL text / vision layouts, GLM's partial GPT-J rotary, fp32, backward."""
    try:
        from vl_rope import _triton_rotary_kernel, triton_rotary
    except ImportError:
        return
    # The rotary launcher accepts only CUDA tensors outside the interpreter; for recording, present it a
    # kernel module that says "interpreter" (this only opens its device guard: meta tensors launch nothing here).
    triton_rotary._kernels = lambda: types.SimpleNamespace(  # type: ignore[assignment]
        INTERPRET=True, rotary_kernel=_triton_rotary_kernel.rotary_kernel
    )
    scenario: list[Any] = ["", (90, 100)]
    cases = [  # (label, B, heads q, heads k, L, D, R, style, dtype)
        ("text neox", 2, 32, 4, 4096, 128, 128, "neox", torch.bfloat16),
        ("text neox fp32", 1, 16, 2, 1024, 128, 128, "neox", torch.float32),
        ("glm partial gptj", 1, 32, 2, 2048, 128, 64, "gptj", torch.bfloat16),
        ("vision neox d72", 1, 16, 16, 4096, 72, 72, "neox", torch.bfloat16),
    ]
    with recording(launches, scenario):
        for label, b, hq, hk, length, d, r, style, dtype in cases:
            scenario[:] = [f"vl_rope {label}", (90, 100)]
            q, k = meta(b, hq, length, d, dtype=dtype), meta(b, hk, length, d, dtype=dtype)
            cos, sin = meta(b, length, r, dtype=torch.float32), meta(b, length, r, dtype=torch.float32)
            q.requires_grad_(True)
            k.requires_grad_(True)
            qo, ko = triton_rotary.apply_rotary_fused(q, k, cos, sin, style=style)
            torch.autograd.grad((qo, ko), (q, k), (torch.empty_like(qo), torch.empty_like(ko)))


@triton.jit
def toy_register_hog(a_ptr, c_ptr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    """Keeps a [BLOCK, BLOCK] float32 tile and its square live in one warp: 2 * 64 * 64 / 32 = 256 values a thread."""
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    b = tl.load(a_ptr + BLOCK * BLOCK + offs[:, None] * BLOCK + offs[None, :])
    c = tl.exp(a) * b + tl.sum(a * b, axis=1)[:, None] * tl.sum(b, axis=0)[None, :]
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], c + a * tl.sum(c, axis=1)[:, None])


@triton.jit
def toy_shared_hog(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # type: ignore[no-untyped-def]
    """A pipelined GEMM with 128 x 128 x 256 bf16 tiles: four stages of them need 384 KiB of shared memory."""
    offs_m, offs_n, offs_k = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :])
        b = tl.load(b_ptr + (k0 + offs_k)[:, None] * BN + offs_n[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs_m[:, None] * BN + offs_n[None, :], acc)


def record_toys(launches: list[Launch]) -> None:
    """The two faults the check must see (sm_90 only)."""
    scenario: list[Any] = ["toy", (90,)]
    with recording(launches, scenario):
        toy_register_hog[(1,)](
            meta(2, 64, 64, dtype=torch.float32), meta(64, 64, dtype=torch.float32), BLOCK=64, num_warps=1
        )
        a, b, c = meta(128, 4096), meta(4096, 128), meta(128, 128, dtype=torch.float32)
        toy_shared_hog[(1,)](a, b, c, 4096, BM=128, BN=128, BK=256, num_warps=8, num_stages=4)


# --------------------------------------------------------------------------- compiling


def specialise(kernel: JITFunction, args: tuple[Any, ...], kwargs: dict[str, Any], arch: int) -> dict[str, Any]:
    """What ``JITFunction.run`` hands to ``triton.compile`` for these arguments on ``arch`` (a picklable job)."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return {
        "module": kernel.fn.__module__,
        "name": kernel.fn.__qualname__,
        "arch": arch,
        "signature": signature,
        "constexprs": constexprs,
        "attrs": attrs,
        "options": dict(options.__dict__),
    }


def _param_name(job: dict[str, Any], path: tuple[int, ...]) -> str:
    names = list(job["signature"])
    return names[path[0]] + "".join(f"[{i}]" for i in path[1:])


def compile_job(job: dict[str, Any]) -> dict[str, Any]:
    """Compile one specialisation and read its resources; never raises (errors become a record field)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    start = time.perf_counter()
    kernel = getattr(importlib.import_module(job["module"]), job["name"])
    arch, options = job["arch"], job["options"]
    record: dict[str, Any] = {
        "kernel": job["name"],
        "module": job["module"],
        "arch": arch,
        "constexprs": {_param_name(job, path): repr(v) for path, v in job["constexprs"].items()},
        "num_warps": options["num_warps"],
        "num_stages": options["num_stages"],
    }
    try:
        target = GPUTarget("cuda", arch, 32)
        src = ASTSource(kernel, job["signature"], job["constexprs"], job["attrs"])
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # Triton prints ptxas' -v report when it runs ptxas
            compiled = triton.compile(src, target=target, options=options)
        log = printed.getvalue()
        # The report is kept next to Triton's cache, keyed by the compiled kernel's hash, for cache hits.
        saved = Path(knobs.cache.dir) / "vl_suite_ptxas" / f"{compiled.metadata.hash}.log"
        if PTXAS_REGS.search(log):
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(log)
        elif saved.is_file():
            log = saved.read_text()
        else:  # Triton's cache had the binary but not our report: assemble its PTX once more
            with tempfile.TemporaryDirectory() as tmp:
                ptx = Path(tmp) / "kernel.ptx"
                ptx.write_text(compiled.asm["ptx"])
                cmd = [get_ptxas(arch).path, "-v", "-lineinfo", "--regAllocOptLevel=2",
                       f"--gpu-name={sm_arch_from_capability(arch)}", str(ptx), "-o", str(ptx) + ".o"]  # fmt: skip
                log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(log)
        frame, stores, loads = (int(v) for v in PTXAS_LINE.search(log).groups())  # type: ignore[union-attr]
        record.update(
            registers=int(PTXAS_REGS.search(log).group(1)),  # type: ignore[union-attr]
            stack_frame=frame,
            spill_stores=stores,
            spill_loads=loads,
            shared=int(compiled.metadata.shared),
            shared_limit=SHARED_LIMIT.get(arch, 232_448),
            threads=options["num_warps"] * 32,
            wgmma="wgmma.mma_async" in compiled.asm["ptx"],
        )
    except Exception as err:  # a compile failure is a finding, reported by the test
        record["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def ptxas_available() -> str | None:
    """The reason ptxas cannot run, or ``None`` when it can (both the sm_90 and the pre-sm_90 one)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        for arch in (90, 100):
            subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, check=True, timeout=60)
    except Exception as err:
        return f"ptxas not usable: {type(err).__name__}: {err}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", type=int, action="append", help="compute capability (90, 100); repeatable")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    start = time.perf_counter()
    missing = ptxas_available()
    if missing:
        args.out.write_text(json.dumps({"skip": missing}))
        return 0
    knobs.nvidia.dump_ptxas_log = True
    launches: list[Launch] = []
    record_moe(launches)
    record_rope(launches)
    record_toys(launches)
    jobs: dict[str, dict[str, Any]] = {}
    scenarios: dict[str, str] = {}
    for arch in args.arch or [90, 100]:
        for kernel, a, kw, scenario, archs in launches:
            if arch not in archs:
                continue
            job = specialise(kernel, a, kw, arch)
            key = repr((job["module"], job["name"], arch, job["signature"], job["constexprs"], job["attrs"],
                        sorted((k, repr(v)) for k, v in job["options"].items())))  # fmt: skip
            if key not in jobs:
                jobs[key], scenarios[key] = job, scenario
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=context) as pool:
        results = list(pool.map(compile_job, jobs.values()))
    for key, record in zip(jobs, results):
        record["scenario"] = scenarios[key]
    body = {"records": results, "launches": len(launches), "seconds": round(time.perf_counter() - start, 1)}
    args.out.write_text(json.dumps(body, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
