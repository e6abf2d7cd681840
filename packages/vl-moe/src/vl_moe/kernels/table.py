"""Tuned tile tables of the Triton MoE kernels: one JSON file per (GPU, layer shape), vLLM's approach.

A table maps token counts to the :class:`~vl_moe.kernels.config.KernelConfig` that ran fastest
for them on one GPU model and one layer shape; :func:`lookup` returns the entry tuned for the
nearest token count (nearest in ratio: 3K tokens take the 4096 entry, not the 1024 one).
``python -m vl_moe.kernels.tune`` measures the candidates on a GPU and writes the file. Files are
searched in ``$VL_MOE_KERNEL_CONFIGS`` (your own tables, first) and then in the package's
``vl_moe/kernels/configs/`` folder. The file name spells the key::

    E=128,H=2048,I=768,k=8,dtype=bfloat16,device=NVIDIA_H200.json

and the content is ``{"meta": {...how it was tuned...}, "configs": {"1": {...}, "4096": {...}}}``
with one :meth:`KernelConfig.to_dict` entry per token count. A malformed file raises
:class:`ValueError` naming the file and the key at fault.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from vl_moe.kernels.config import KernelConfig, rule

__all__ = ["CONFIG_DIR", "ENV_VAR", "lookup", "pick_config", "read_table", "table_name", "write_table"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The tables shipped inside the package."""
ENV_VAR = "VL_MOE_KERNEL_CONFIGS"
"""Environment variable naming an extra folder of tables, searched before :data:`CONFIG_DIR`."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def table_name(device_name: str, num_experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype) -> str:
    """The file name of the table for this GPU model and layer shape (spaces and odd characters become ``_``)."""
    device = re.sub(r"[^A-Za-z0-9.\-]+", "_", device_name.strip())
    return f"E={num_experts},H={hidden},I={inter},k={top_k},dtype={_dtype_name(dtype)},device={device}.json"


def read_table(path: Path) -> dict[int, KernelConfig]:
    """``{num_tokens: config}`` of one table file.

    Raises:
        ValueError: Not JSON, no ``configs`` object, a key that is not a positive integer, or an
            entry that is not a valid :class:`KernelConfig` (the message names the file and key).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    configs = data.get("configs") if isinstance(data, dict) else None
    if not isinstance(configs, dict) or not configs:
        raise ValueError(f"{path}: expected an object with a non-empty 'configs' object")
    table: dict[int, KernelConfig] = {}
    for key, entry in configs.items():
        if not key.isdigit() or int(key) < 1:
            raise ValueError(f"{path}: configs key {key!r} is not a positive token count")
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: configs[{key!r}] is not an object")
        table[int(key)] = KernelConfig.from_dict(entry, where=f"{path}: configs[{key!r}]")
    return table


def write_table(path: Path, table: dict[int, KernelConfig], meta: dict[str, Any]) -> None:
    """Write ``table`` (``{num_tokens: config}``) and ``meta`` (how it was tuned) as one table file."""
    body = {"meta": meta, "configs": {str(t): table[t].to_dict() for t in sorted(table)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


@functools.lru_cache(maxsize=64)
def _find(name: str, extra_dir: str | None) -> dict[int, KernelConfig] | None:
    for folder in (Path(extra_dir) if extra_dir else None, CONFIG_DIR):
        if folder is not None and (folder / name).is_file():
            return read_table(folder / name)
    return None


def lookup(
    device_name: str,
    num_experts: int,
    hidden: int,
    inter: int,
    top_k: int,
    dtype: torch.dtype,
    *,
    num_tokens: int,
) -> KernelConfig | None:
    """The tuned config for the token count nearest ``num_tokens`` (in ratio), or ``None`` without a table.

    Tables are read once per process (cached by file name and ``$VL_MOE_KERNEL_CONFIGS``).
    """
    table = _find(table_name(device_name, num_experts, hidden, inter, top_k, dtype), os.environ.get(ENV_VAR))
    if not table:
        return None
    wanted = math.log(max(num_tokens, 1))
    nearest = min(table, key=lambda t: (abs(math.log(t) - wanted), t))
    return table[nearest]


def pick_config(
    num_pairs: int,
    num_experts: int,
    *,
    interpret: bool,
    train: bool = True,
    hidden: int | None = None,
    inter: int | None = None,
    top_k: int | None = None,
    dtype: torch.dtype | None = None,
    device_name: str | None = None,
) -> KernelConfig:
    """Choose tile sizes: the tuned table's entry for this GPU and shape if there is one, else the rule.

    Args:
        num_pairs: ``P = T * k`` routed (token, slot) pairs.
        num_experts: ``E``.
        interpret: Whether the kernels run in Triton's CPU interpreter (small fixed tiles).
        train: Whether gradients will be wanted (the decode path is inference only).
        hidden: ``H``; with ``inter``, ``top_k``, ``dtype`` and ``device_name``, selects a tuned table.
        inter: ``I``.
        top_k: ``k``.
        dtype: The inputs' dtype.
        device_name: ``torch.cuda.get_device_name()`` of the GPU the kernels run on.

    Returns:
        The config for every kernel of this forward and its backward.
    """
    if interpret:
        return KernelConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1, group_m=4)
    if None not in (hidden, inter, top_k, dtype, device_name):
        assert hidden is not None and inter is not None and top_k is not None and dtype is not None
        assert device_name is not None
        tuned = lookup(device_name, num_experts, hidden, inter, top_k, dtype, num_tokens=num_pairs // top_k)
        if tuned is not None and not (train and tuned.decode):
            return tuned
    aligned = all(width is None or width % 16 == 0 for width in (hidden, inter))
    return rule(num_pairs, num_experts, train=train, dtype=dtype, aligned=aligned)
