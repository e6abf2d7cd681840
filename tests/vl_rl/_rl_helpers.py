"""Tiny models, processors and synthetic samples for the rollout / trainer / CLI tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

# Rollouts, the trainer and the CLI need the `train` extra; the isolated core install skips these tests.
pytest.importorskip("vl_train", reason="needs vl-rl[train] (vl-train, vl-model) for rollouts and the trainer")
pytest.importorskip("vl_model", reason="needs vl-rl[train] (vl-train, vl-model) for rollouts and the trainer")

from vl_train.builders import build_model
from vl_train.data.synthetic import SyntheticDataset
from vl_train.testing import TINY_TEXT, TINY_VISION

TINY_MODEL: dict[str, Any] = {
    "tokenizer": "demo",
    "seed": 0,
    "text": {
        **TINY_TEXT,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
    },
    "vision": {
        **TINY_VISION,
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "deepstack_visual_indexes": [0],
    },
    "min_pixels": 1024,
    "max_pixels": 4096,
}


def tiny(seed: int = 0) -> tuple[Any, Any]:
    """``(model, processor)``: a one-layer model with the demo tokenizer (about 20K parameters)."""
    model, processor = build_model({**TINY_MODEL, "seed": seed})
    return model, processor


def samples(n: int, tasks: tuple[str, ...] = ("count",), thinking: float = 0.0, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` small synthetic samples (48-64 px images)."""
    ds = SyntheticDataset("train", size=n, seed=seed, tasks=list(tasks), image_size_range=(48, 64), thinking=thinking)
    return [ds[i] for i in range(n)]


class ScriptedModel(torch.nn.Module):
    """A fake policy whose ``generate`` appends scripted token rows and records every call's arguments.

    Args:
        script: ``script(call_index, input_ids) -> one token list per row`` (cut at ``max_new_tokens``;
            shorter rows are padded with the pad id, as Hugging Face pads finished rows).
    """

    def __init__(self, script: Callable[[int, torch.Tensor], list[list[int]]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script = script
        self.calls: list[dict[str, Any]] = []

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.calls.append({"input_ids": input_ids, **kwargs})
        rows = [list(r)[: kwargs["max_new_tokens"]] for r in self.script(len(self.calls) - 1, input_ids)]
        width = max(len(r) for r in rows)
        out = torch.full((input_ids.shape[0], width), kwargs["pad_token_id"], dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return torch.cat([input_ids, out], 1)


def ids(processor: Any, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added)."""
    return list(processor.tokenizer.encode(text, add_special_tokens=False))
