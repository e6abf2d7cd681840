"""A tiny Qwen3-VL-style model and deterministic synthetic batches (with a checkpointable position) for trainer tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from vl_model import VLConfig, VLForConditionalGeneration

VOCAB = 300
VISION_START, VISION_END, IMAGE, VIDEO = 251, 252, 253, 254
PATCH_DIM = 3 * 2 * 4 * 4  # channels x temporal patch x patch x patch
GRID = (1, 4, 4)  # one image: 16 patches -> 4 merged tokens (spatial merge 2)
IMAGE_TOKENS = GRID[0] * GRID[1] * GRID[2] // 4


def tiny_config_dict(moe: bool = False) -> dict[str, Any]:
    """An official-style ``qwen3_vl`` config, small enough for ~10 ms steps."""
    text: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    }
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)
    vision = {
        "depth": 2,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "patch_size": 4,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 32,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],
    }
    return {
        "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": IMAGE,
        "video_token_id": VIDEO,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "tie_word_embeddings": False,
    }


def tiny_model(
    seed: int = 0, dtype: torch.dtype = torch.float32, moe: bool = False, aux_coef: float = 0.001
) -> VLForConditionalGeneration:
    """A randomly initialised tiny ``VLForConditionalGeneration`` (same weights for the same seed).

    ``aux_coef``: the MoE balance-loss coefficient (the config's ``router_aux_loss_coef``).
    """
    torch.manual_seed(seed)
    model = VLForConditionalGeneration(VLConfig.from_qwen3_vl(tiny_config_dict(moe)))
    model.config.text_config.router_aux_loss_coef = aux_coef
    return model.to(dtype)


def make_row(gen: torch.Generator, length: int, multimodal: bool) -> dict[str, torch.Tensor]:
    """One row: ``[prompt (with an image)] answer``; labels on the answer only."""
    ids = torch.randint(0, 250, (length,), generator=gen)
    labels = ids.clone()
    prompt = length // 2
    if multimodal:
        ids[1] = VISION_START
        ids[2 : 2 + IMAGE_TOKENS] = IMAGE
        ids[2 + IMAGE_TOKENS] = VISION_END
    labels[:prompt] = -100
    return {"input_ids": ids, "labels": labels}


def make_batch(gen: torch.Generator, rows: int, length: int, multimodal: bool = True) -> dict[str, torch.Tensor]:
    """``rows`` rows of ``length`` tokens, each with one image when ``multimodal``."""
    made = [make_row(gen, length, multimodal) for _ in range(rows)]
    batch = {k: torch.stack([r[k] for r in made]) for k in ("input_ids", "labels")}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if multimodal:
        batch["pixel_values"] = torch.randn(rows * GRID[0] * GRID[1] * GRID[2], PATCH_DIM, generator=gen)
        batch["image_grid_thw"] = torch.tensor([GRID] * rows)
    return batch


def concat_batches(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows of several batches (of one row length) as one batch."""
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


class SyntheticBatches(Iterator[dict[str, torch.Tensor]]):
    """An endless, deterministic batch stream: batch ``i`` depends only on ``(seed, i mod distinct)``.

    Its position is checkpointable (``state_dict`` / ``load_state_dict``), as the trainer expects.
    """

    def __init__(
        self,
        seed: int = 0,
        rows: int = 2,
        length: int = 16,
        *,
        distinct: int | None = None,
        multimodal: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.seed, self.rows, self.length, self.distinct = seed, rows, length, distinct
        self.multimodal, self.dtype = multimodal, dtype
        self.index = 0

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        key = index if self.distinct is None else index % self.distinct
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        out = make_batch(gen, self.rows, self.length, self.multimodal)
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    def __next__(self) -> dict[str, torch.Tensor]:
        out = self.batch(self.index)
        self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])


def nan_hook(model: VLForConditionalGeneration, bad_calls: set[int]) -> Callable[[], None]:
    """Make the decoder's final norm output NaN on the forward calls (0-based) in ``bad_calls``.

    Returns a function removing the hook.
    """
    calls = [0]

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        index = calls[0]
        calls[0] += 1
        return output * float("nan") if index in bad_calls else None

    handle = model.model.language_model.norm.register_forward_hook(hook)
    return handle.remove


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def quiet(**overrides: Any) -> dict[str, Any]:
    """``TrainConfig`` keyword arguments for fast, file-light test runs."""
    base: dict[str, Any] = {
        "lr": 1e-3,
        "warmup_steps": 0,
        "max_steps": 3,
        "tensorboard": False,
        "plot": False,
        "progress": False,
        "bf16": False,
        "loss_chunk_size": 64,
        "max_length": 64,
    }
    merged = base | overrides
    optim = {k: merged.pop(k) for k in list(merged) if k in OPTIM_KEYS}
    return merged | {"optim": optim}


OPTIM_KEYS = {"lr", "lr_vision", "lr_merger", "lr_llm", "weight_decay", "warmup_steps", "min_lr_ratio", "max_grad_norm"}
"""``TrainConfig(**quiet(...))`` moves these into its ``optim`` section."""
