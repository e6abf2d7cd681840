"""The prepared GPU run (issue 22): one script for a lent H100/H200 that finishes in under 9 minutes.

``python -m nox -s gpu`` (a venv with the packages installed) or, on a machine whose Python already
has CUDA torch, Triton and transformers (the lent device), ``python3 benchmarks/gpu/run_gpu.py``.
Sections, each guarded by the time left (``--budget-s``, default 480 s) and by its own errors (a
failing section is reported and the next one runs; the exit status is 1 if any failed):

1. versions (python, torch, CUDA, triton, transformers, git commit) and ``nvidia-smi``;
2. the ``gpu``-marked tests of vl-moe, vl-rope, vl-vision and vl-model (``pytest -m gpu``), with
   this checkout's ``packages/*/src`` first on ``PYTHONPATH`` (printed: what was imported from where);
3. the measured ceilings (bf16 matrix rate, copy bandwidth) for the roofline;
4. MoE: output and the four gradients (x, both expert weights, routing weights) at 4K tokens on
   the large-tile path against float32 autograd; the timing grid (T = 16384, 1, 4096, 64;
   forward and forward + backward; balanced / Zipf / real-router routing; ours vs transformers'
   grouped_mm and eager; CUDA-graph replay, weights rotated over 4 layers); the per-kernel profile
   at 16K tokens;
5. the vision tower (SO-400M, bf16) and a Qwen3-VL-2B-sized model (bf16) against transformers.

Everything lands in ``--out`` (default ``$OUT``, else ``benchmarks/gpu/out``): ``RESULTS-gpu.md``
(a fragment for benchmarks/RESULTS.md: date, GPU, versions, command, tables, the issue's targets),
``gpu-results.json`` and ``pytest-gpu.log``. Without CUDA it exits with status 2 and says why.
``--cpu-smoke`` runs every section at toy sizes on the CPU (Triton's interpreter; wall-clock
timers): the test suite uses it to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vl-rope", "vl-vision", "vl-moe", "vl-model", "vl-train", "vl-rl")
SOURCES = [str(ROOT / "packages" / p / "src") for p in PACKAGES]
TEST_DIRS = ("tests/vl_moe", "tests/vl_rope", "tests/vl_vision", "tests/vl_model")
# This checkout's sources and the repo root (for `benchmarks.gpu`) come first, for this process and its pytest.
for path in [str(ROOT), *SOURCES][::-1]:
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

NO_CUDA = (
    "run_gpu: no CUDA GPU here (torch.cuda.is_available() is False, torch {torch}); this script measures the "
    "kernels on a GPU. Run it on a machine with one (python -m nox -s gpu), or pass --cpu-smoke to check the "
    "script itself on toy sizes."
)


def checkout_env() -> dict[str, str]:
    """The environment for child processes: this checkout's ``packages/*/src`` first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*SOURCES, *filter(None, [env.get("PYTHONPATH")])])
    return env


def pytest_command(*extra: str) -> list[str]:
    """``pytest -m gpu`` over the four packages' tests, from the repo root (its pyproject holds the config)."""
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", *TEST_DIRS, *extra]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("triton", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "not installed"
    try:  # a copied working tree may have no .git, a bare machine no git
        git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        found["commit"] = git.stdout.strip() or "unknown (no git checkout)"
    except OSError:
        found["commit"] = "unknown (no git)"
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
        found["driver"] = _smi(["--query-gpu=driver_version", "--format=csv,noheader"]).strip()
    return found


def _smi(args: list[str]) -> str:
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi unavailable: {err}"


def run_tests(out: Path, time_left: float, smoke: bool) -> dict[str, Any]:
    """The gpu-marked tests in a child pytest (collection only in the smoke run); log to ``pytest-gpu.log``."""
    probe = subprocess.run([sys.executable, "-c", "import vl_moe, vl_rope, vl_vision, vl_model; "
                            "print(vl_moe.__file__, vl_rope.__file__, vl_vision.__file__, vl_model.__file__)"],
                           env=checkout_env(), cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    cmd = pytest_command("--collect-only") if smoke else pytest_command()
    try:
        proc = subprocess.run(cmd, env=checkout_env(), cwd=ROOT, capture_output=True, text=True,
                              timeout=max(30, time_left))  # fmt: skip
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, log = 124, f"timed out after {err.timeout:.0f} s\n{err.stdout or ''}"
    (out / "pytest-gpu.log").write_text(f"$ {shlex.join(cmd)}\n{log}")
    summary = [line for line in log.splitlines() if line.strip()][-1:] or ["(no output)"]
    print(f"  {summary[0]}")
    # 5 = nothing collected (a package without gpu tests): not a failure of the ones that exist
    return {"command": shlex.join(cmd), "returncode": rc, "summary": summary[0], "ok": rc in (0, 5),
            "imported_from": probe.stdout.split() or probe.stderr.strip()[-300:]}  # fmt: skip


class Run:
    """Sections run in order against one deadline; each one's result or error is kept."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s
        self.results: dict[str, Any] = {}
        self.failed: list[str] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, needs_s: float, fn: Callable[[], Any]) -> Any:
        if self.left() < needs_s:
            print(f"== {name}: skipped ({self.left():.0f} s left, needs about {needs_s:.0f})", flush=True)
            self.results[name] = {"skipped": f"out of time ({self.left():.0f} s left)"}
            return None
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        start = time.monotonic()
        try:
            value = fn()
        except Exception as err:
            traceback.print_exc()
            self.failed.append(name)
            self.results[name] = {"error": f"{type(err).__name__}: {err}"}
            return None
        self.results[name] = value
        print(f"   {name}: {time.monotonic() - start:.0f} s", flush=True)
        return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "gpu" / "out"))
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no section that would end after this (s)")
    parser.add_argument("--skip", nargs="*", default=[], help="sections to leave out: tests moe models")
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU (Triton interpreter): tests only")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__), file=sys.stderr)
        return 2
    if args.cpu_smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print(
            "run_gpu: --cpu-smoke needs TRITON_INTERPRET=1 (the kernels run in Triton's interpreter)", file=sys.stderr
        )
        return 2
    from benchmarks.gpu import models, moe, report, timing

    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.budget_s)
    started = datetime.datetime.now(datetime.UTC)
    run.results["versions"] = versions()
    print(json.dumps(run.results["versions"]), "\n" + _smi([]), flush=True)
    if "tests" not in args.skip:
        run.section("tests", 60, lambda: run_tests(args.out, run.left() - 300, args.cpu_smoke))
    peaks = run.section("ceilings", 10, lambda: timing.ceilings(device)) or {"tflops": 790.0, "tbps": 4.3}
    if "moe" not in args.skip:
        shape = report.smoke_moe_shape() if args.cpu_smoke else moe.MoEShape()
        gen = torch.Generator(device=device).manual_seed(0)
        run.section("moe_gradients", 30, lambda: moe.gradient_check(shape, device, gen))
        layers = run.section("moe_layers", 30, lambda: moe.make_layers(shape, device, gen))
        if layers is not None:
            run.section("moe_timings", 90, lambda: moe.timing_grid(shape, layers, device, gen, peaks,
                                                                   lambda: run.left() - 150))  # fmt: skip
            run.section("moe_profile", 20, lambda: moe.profile_table(shape, layers, device, gen))
            del layers
            if device == "cuda":
                torch.cuda.empty_cache()
    if "models" not in args.skip:
        vision = report.smoke_vision_shape() if args.cpu_smoke else models.VisionShape()
        run.section("vision_tower", 45, lambda: models.vision_tower(vision, device))
        model = report.smoke_model_shape() if args.cpu_smoke else models.ModelShape()
        run.section("vl_model", 120, lambda: models.vl_model(model, device))
    command = " ".join(["python", "benchmarks/gpu/run_gpu.py", *(argv if argv is not None else sys.argv[1:])])
    text = report.markdown(run.results, peaks, started, command, run.failed)
    (args.out / "RESULTS-gpu.md").write_text(text)
    (args.out / "gpu-results.json").write_text(json.dumps(run.results, indent=1, default=str))
    print(text, flush=True)
    print(f"wrote {args.out / 'RESULTS-gpu.md'} and gpu-results.json; failed sections: {run.failed or 'none'}")
    tests = run.results.get("tests") or {}
    return 1 if run.failed or tests.get("ok") is False else 0


if __name__ == "__main__":
    sys.exit(main())
