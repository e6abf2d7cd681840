"""The memory planner (``vl-train plan``, ``vl_train.plan``): parameter counts, terms, measured peaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vl_train.cli import main
from vl_train.plan import PRESETS, model_parts, plan_memory, plan_table

PROBE = Path(__file__).with_name("_plan_probe.py")


def test_presets_have_the_public_parameter_counts() -> None:
    billions = {
        "Qwen3-VL-2B": 2.13,
        "Qwen3-VL-8B": 8.77,
        "Qwen3-VL-32B": 33.4,
        "Qwen3-VL-30B-A3B": 31.1,
        "Qwen3-VL-235B-A22B": 235.7,
    }
    for name, want in billions.items():
        assert model_parts(PRESETS[name]).total / 1e9 == pytest.approx(want, rel=0.01), name
    moe = model_parts(PRESETS["Qwen3-VL-30B-A3B"])
    # 48 layers x 128 experts x 3 x 768 x 2048 expert weights; the tower is SigLIP-2 SO-400M-sized
    assert moe.experts == 48 * 128 * 3 * 768 * 2048
    assert 0.5e9 < moe.vision < 0.6e9


def test_terms_follow_the_parallelism() -> None:
    config = PRESETS["Qwen3-VL-30B-A3B"]
    one = plan_memory(config, tokens=32768, world_size=8)
    cp = plan_memory(config, tokens=32768, world_size=8, context_parallel=4)
    ep = plan_memory(config, tokens=32768, world_size=8, expert_parallel=8)
    parts = one.parts
    assert one.states == 16 * parts.total // 8 and one.tokens_per_rank == 32768 and cp.tokens_per_rank == 8192
    assert cp.checkpoints == one.checkpoints // 4  # layer inputs of a quarter of the row
    assert cp.working < one.working / 3  # a quarter of the tokens, plus the all-to-all copies
    # FSDP gathers the root and two layers (7/8 of them: the local shard is in the states); EP never the experts
    assert one.gathered == (parts.root + 2 * parts.largest_layer) * 2 * 7 // 8
    assert ep.gathered == (parts.root + 2 * (parts.largest_layer - parts.largest_layer_experts)) * 2 * 7 // 8
    no_ckpt = plan_memory(config, tokens=32768, world_size=8, activation_checkpointing=False)
    assert no_ckpt.checkpoints == 0 and no_ckpt.working == 48 * one.working
    assert one.total == one.states + one.gathered + one.activations  # packed rows cost no [L, L] mask
    with pytest.raises(ValueError, match="must divide world_size"):
        plan_memory(config, tokens=8, world_size=6, context_parallel=4)
    with pytest.raises(ValueError, match="expert_parallel must be 1 or world_size"):
        plan_memory(config, tokens=8, world_size=8, expert_parallel=2)


def test_table_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    table = plan_table(tokens=32768, world_size=16)
    assert table.count("\n") == 1 + len(PRESETS) and "| Qwen3-VL-8B | 8.8B |" in table
    assert (
        main(["plan", "--model", "Qwen3-VL-30B-A3B", "--tokens", "32768", "--world", "16", "--cp", "2", "--ep", "16"])
        == 0
    )
    out = capsys.readouterr().out
    assert "CP 2, EP 16" in out and "| Qwen3-VL-30B-A3B | 31.1B |" in out
    assert main(["plan", "--model", "nope"]) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and relies on glibc's mmap threshold")
@pytest.mark.parametrize("checkpointing", [True, False])
def test_plan_matches_measured_cpu_peaks(checkpointing: bool) -> None:
    # fp32 steps of a 4-layer model on a 4K-token row: ~0.3 GB with checkpointing, ~0.7 GB without; the
    # planner was within 2-12% of the measured peaks at 2K, 4K and 8K tokens
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, str(PROBE), "4096", "1" if checkpointing else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["measured"] == pytest.approx(got["planned"], rel=0.2), got
