"""The prepared GPU run (``benchmarks/gpu/run_gpu.py``, ``nox -s gpu``) checked without a GPU.

- Without CUDA it exits with status 2 and a message that says what it needs.
- ``--cpu-smoke`` runs every section at toy sizes on the CPU (Triton's interpreter, wall-clock
  timers): the tests' collection with this checkout's sources first on ``PYTHONPATH`` (the same
  child ``pytest -m gpu`` the GPU run starts, which must import the packages from here and not
  from wherever they happen to be installed), the four-gradient check, the timing grid, the
  profile, the vision tower and the VLM against transformers, and the RESULTS fragment.
- The targets table reads the grid's rows right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run_gpu.py"


def test_without_cuda_exits_with_a_clear_message() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU here" in proc.stderr and "--cpu-smoke" in proc.stderr


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    env.pop("PYTHONPATH", None)  # the script must put this checkout's sources first by itself
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu-results.json").read_text())
    for section in ("tests", "moe_gradients", "moe_timings", "moe_profile", "vision_tower", "vl_model"):
        assert section in results and "error" not in results[section] and "skipped" not in results[section], section
    tests = results["tests"]
    assert tests["ok"] and "--collect-only" in tests["command"] and "collected" in tests["summary"], tests
    for path in tests["imported_from"]:  # this checkout's sources, not an installed copy elsewhere
        assert Path(path).resolve().is_relative_to(ROOT / "packages"), tests["imported_from"]
    assert results["moe_gradients"]["ok"], results["moe_gradients"]
    modes = {(r["tokens"], r["mode"], r["impl"]) for r in results["moe_timings"]}
    assert {(5, "fwd", "ours"), (5, "fwd+bwd", "grouped_mm"), (1, "fwd", "eager")} <= modes
    text = (tmp_path / "RESULTS-gpu.md").read_text()
    for needle in ("## GPU run", "Command: `python benchmarks/gpu/run_gpu.py --cpu-smoke", "torch 2.", "**Targets**",
                   "MoE gradients", "Per-kernel profile", "Vision tower", "VLM"):  # fmt: skip
        assert needle in text, needle
    assert "pytest" in (tmp_path / "pytest-gpu.log").read_text()


def test_targets_read_the_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.gpu import report

    def row(tokens: int, mode: str, impl: str, ms: float, tflops: float = 0.0) -> dict[str, object]:
        return {"tokens": tokens, "routing": "router", "mode": mode, "impl": impl, "ms": ms, "tflops": tflops,
                "method": "cuda graph"}  # fmt: skip

    rows = [row(16384, "fwd", "ours", 3.0, 460.0), row(16384, "fwd+bwd", "ours", 10.0, 370.0),
            row(16384, "fwd", "grouped_mm", 4.5), row(16384, "fwd+bwd", "grouped_mm", 12.0),
            row(1, "fwd", "ours", 0.025)]  # fmt: skip
    found = {
        target.split(" ")[1] if target.startswith("MoE") else target: met for target, _, met in report.targets(rows)
    }
    assert found["fwd"] is True and found["fwd+bwd"] is False
    assert found["1-token decode <= 30 us"] is True
    assert found[">= 1.3x grouped_mm from 4K tokens"] is False  # fwd+bwd is only 1.2x
    assert [met for *_, met in report.targets([])] == [None, None, None, None]
