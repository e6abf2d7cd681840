"""Tuned tile tables (``vl_moe.kernels.table``), the rule behind ``pick_config`` and the sweep script ``tune``.

The sweep needs a GPU to mean anything; here its whole loop runs on CPU under Triton's interpreter at
a tiny shape (``--device cpu``), and the table it writes is read back by ``lookup``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from vl_moe.kernels import KernelConfig, pick_config, table
from vl_moe.kernels import tune as tune_script

GPU = "NVIDIA H200"
SHAPE = {"num_experts": 128, "hidden": 2048, "inter": 768, "top_k": 8, "dtype": torch.bfloat16}


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv(table.ENV_VAR, str(tmp_path))
    table._find.cache_clear()
    yield tmp_path
    table._find.cache_clear()


def _write(folder: Path, entries: dict[int, KernelConfig]) -> Path:
    path = folder / table.table_name(GPU, *SHAPE.values())
    table.write_table(path, entries, {"note": "test"})
    return path


def test_table_name_spells_the_key() -> None:
    name = table.table_name("NVIDIA H100 80GB HBM3", 128, 2048, 768, 8, torch.bfloat16)
    assert name == "E=128,H=2048,I=768,k=8,dtype=bfloat16,device=NVIDIA_H100_80GB_HBM3.json"


def test_lookup_takes_the_nearest_token_count_in_ratio(config_dir: Path) -> None:
    small = KernelConfig(block_m=16, block_n=32, block_k=256, decode=True)
    mid = KernelConfig(block_m=32, block_n=64, block_k=64, group_m=1)
    large = KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, block_dw=128)
    _write(config_dir, {1: small, 1024: mid, 4096: large})
    assert table.lookup(GPU, *SHAPE.values(), num_tokens=1) == small
    assert table.lookup(GPU, *SHAPE.values(), num_tokens=3000) == large  # 4096/3000 < 3000/1024
    assert table.lookup(GPU, *SHAPE.values(), num_tokens=1500) == mid
    assert table.lookup("NVIDIA A100", *SHAPE.values(), num_tokens=1) is None  # no table for that GPU


def test_pick_config_prefers_the_table_and_keeps_training_off_the_decode_path(config_dir: Path) -> None:
    decode = KernelConfig(block_m=16, block_n=32, block_k=256, decode=True)
    _write(config_dir, {8: decode, 16384: KernelConfig(block_m=128, block_n=64, block_k=32, group_m=16)})
    args = {"hidden": 2048, "inter": 768, "top_k": 8, "dtype": torch.bfloat16, "device_name": GPU}
    assert pick_config(64, 128, interpret=False, train=False, **args) == decode
    trained = pick_config(64, 128, interpret=False, train=True, **args)
    assert not trained.decode and trained.block_m == 16  # the rule, since the tuned entry is inference only
    assert pick_config(16384 * 8, 128, interpret=False, **args).group_m == 16
    assert pick_config(16384 * 8, 128, interpret=True, **args).block_m == 16  # the interpreter ignores tables


def test_rule_narrows_tiles_for_float32_and_unaligned_widths() -> None:
    bf16 = pick_config(16384 * 8, 128, interpret=False, hidden=2048, inter=768, dtype=torch.bfloat16)
    fp32 = pick_config(16384 * 8, 128, interpret=False, hidden=2048, inter=768, dtype=torch.float32)
    odd = pick_config(16384 * 8, 128, interpret=False, hidden=1000, inter=360, dtype=torch.bfloat16)
    assert bf16.block_m == 128 and fp32.block_m == 64 and fp32.dw_tile == 64
    assert odd.block_n <= 32 and odd.block_k <= 32 and odd.dw_tile == 64


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"meta": {}}', "non-empty 'configs'"),
        ('{"configs": {"many": {"block_m": 16, "block_n": 16, "block_k": 16}}}', "'many' is not a positive token"),
        ('{"configs": {"8": {"block_m": 16, "block_n": 16, "block_k": 16, "tile": 3}}}', r"configs\['8'\]: unknown"),
        ('{"configs": {"8": {"block_m": 24, "block_n": 16, "block_k": 16}}}', "block_m must be a power of two"),
        ('{"configs": {"8": {"block_n": 16, "block_k": 16}}}', r"configs\['8'\]: .*block_m"),
    ],
)
def test_malformed_table_names_file_and_key(config_dir: Path, content: str, match: str) -> None:
    path = config_dir / table.table_name(GPU, *SHAPE.values())
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        table.lookup(GPU, *SHAPE.values(), num_tokens=8)
    assert str(path) in str(info.value)


def test_package_ships_only_valid_tables() -> None:
    """Every shipped table parses, and its file name parses as a key (the compile check relies on it)."""
    for path in table.CONFIG_DIR.glob("*.json"):
        assert table.read_table(path), path
        assert path.name.startswith("E=") and ",device=" in path.name


def test_tune_writes_a_table_that_lookup_serves(config_dir: Path) -> None:
    """The sweep's whole loop (inputs, rule, candidates, checks, timing, file) at a tiny shape on the interpreter."""
    from vl_moe.kernels import _common

    if not _common.INTERPRET:
        pytest.skip("the CPU sweep runs under Triton's interpreter")
    lines: list[str] = []
    namespace = argparse.Namespace(
        experts=4, hidden=32, inter=16, top_k=2, dtype="float32", tokens=[2, 6], objective="auto",
        max_candidates=3, rep_ms=1.0, rtol=1e-4, device="cpu", seed=0, out=config_dir,
    )  # fmt: skip
    path = tune_script.tune(namespace, log=lines.append)
    assert path.name == "E=4,H=32,I=16,k=2,dtype=float32,device=cpu.json"
    written = table.read_table(path)
    assert set(written) == {2, 6}
    meta = json.loads(path.read_text())["meta"]
    assert meta["device"] == "cpu" and set(meta["timings"]) == {"2", "6"}
    assert any(line.startswith("T=2 (forward): best") for line in lines), lines
    assert table.lookup("cpu", 4, 32, 16, 2, torch.float32, num_tokens=5) == written[6]
    # The command line, with the training objective (forward + backward timed and checked).
    argv = ["--device", "cpu", "--experts", "4", "--hidden", "32", "--inter", "16", "--top-k", "2", "--dtype",
            "float32", "--tokens", "3", "--objective", "train", "--max-candidates", "2", "--out", str(config_dir)]  # fmt: skip
    assert tune_script.main(argv) == 0
    assert set(table.read_table(path)) == {2, 3, 6}  # merged into the GPU and shape's one file


def test_tune_refuses_cuda_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        tune_script.main(["--device", "cuda", "--tokens", "1"])
