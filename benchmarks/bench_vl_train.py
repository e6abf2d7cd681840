"""Questions: is vl_train's training step faster than a plain loop over transformers' Qwen3-VL, and how
much memory do activation checkpointing and the chunked loss save on a long packed row?

Both models load the same official-format checkpoint: a transformers ``Qwen3VLConfig`` (text: hidden
256, 4 layers, 4 heads, 2 KV heads, head_dim 64, intermediate 768, vocab 151936 (the real vocabulary:
the LM head is a real cost), mrope_section [12, 10, 10], untied embeddings; vision: depth 2, width 128,
2 heads, out 256, DeepStack taps [0, 1], patch 16, merge 2), random init with a fixed seed,
``save_pretrained`` into a temporary folder, then ``Qwen3VLForConditionalGeneration.from_pretrained``
and ``VLForConditionalGeneration.from_pretrained`` (sdpa, float32).

Data is built by hand (not rendered by a processor): random text ids below every special id with
224 px image runs (``<vision_start> <image> x 49 <vision_end>``) and random pixel patches. Image ids are the ``Qwen3VLConfig`` defaults, which both models read from the config.

1. Throughput: the same batch (2 rows x 1024 tokens, one image per row, SFT-style labels on the last
   256 tokens of each row, one micro-batch) every step. Our model projects the vocabulary only at
   labelled positions; transformers projects all 2048 (with labels on every text token both pay the
   full projection; one measurement on a busy 2-core machine gave 1.1x).
   Baseline: ``out = model(**batch, labels=labels); out.loss.backward(); opt.step(); opt.zero_grad()``
   with ``torch.optim.AdamW``. Ours: ``vl_train.Trainer(...).train_step()`` with ``loss_reduction="token"``
   (transformers' mean over labelled tokens), no gradient clipping, the same AdamW settings. The
   first-step losses (from identical weights) are checked equal (rel 1e-3) before timing; the ratio
   is over whole optimiser steps, the note gives tokens/s.
2. Memory: one packed row of 32K tokens (8K in the quick run) of 1K-token samples separated by
   ``segment_ids``, one image per sample, SFT-style labels on the last 1/16 of every sample (2048
   labelled tokens at 32K). A smaller model than row 1 keeps a 32K step short on 2 CPU cores: text
   hidden 128, 2 layers, 2 heads (1 KV head), head_dim 64, intermediate 384, the real 151936
   vocabulary; vision depth 1, width 64. Ours with ``activation_checkpointing=True`` and
   ``loss_chunk_size=256`` (8 chunks at 32K, 2 at 8K) vs ours without checkpointing and with a loss chunk as large as the labelled-token count (one chunk:
   the full ``[labelled, V]`` logits, what a plain loss pays). One ``train_step()`` per side (a 32K
   step is slow here): its peak of live tensor storage, counted by ``benchmarks/_memory.py``, and its
   time, taken with the counter attached on both sides (its per-operator cost is small next to a step).
   The AdamW state is created at the end of that first step, after the activation peak, so it does
   not change the peaks. The first-step losses are checked equal. The row's ratio is the step time
   (checkpointing pays for its memory with a recomputed forward, so expect < 1); the note carries both
   peaks and their ratio. SDPA attends within each sample's span on both sides (no ``[L, L]`` mask;
   before vl-model 0.2.0 a dense 1 GiB boolean mask at 32K was a floor under both peaks).
"""

from __future__ import annotations

import gc
import itertools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import Row, compare
from benchmarks._memory import peak_tensor_mb

BENCH = "VL training (CPU)"
BASELINE = "plain loop over transformers Qwen3VLForConditionalGeneration (sdpa) + AdamW"
VOCAB = 151936
IMAGE, VISION_START, VISION_END = 151655, 151652, 151653  # Qwen3VLConfig defaults
PATCH, MERGE = 16, 2
PATCH_DIM = 3 * 2 * PATCH * PATCH
GRID = [1, 224 // PATCH, 224 // PATCH]  # one 224 px image: 196 patches, 49 merged tokens
IMAGE_TOKENS = GRID[0] * GRID[1] * GRID[2] // MERGE**2
ROWS, SEQ, ANSWER = 2, 1024, 256  # throughput batch: SFT-style labels on the last ANSWER tokens of a row
SAMPLE = 1024  # packed sample length in the memory row
MEMORY_CHUNK = 256  # the lean side's loss chunk (labelled tokens per vocabulary projection)
LR = 1e-4


def _hf_config(small: bool = False) -> Any:
    """Row 1's config, or (``small``) the memory row's narrower, shallower one with the same vocabulary."""
    import transformers

    width = 128 if small else 256
    text = {
        "vocab_size": VOCAB,
        "hidden_size": width,
        "intermediate_size": 3 * width,
        "num_hidden_layers": 2 if small else 4,
        "num_attention_heads": 2 if small else 4,
        "num_key_value_heads": 1 if small else 2,
        "head_dim": 64,
        "max_position_embeddings": 65536,
        "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [12, 10, 10]},
    }
    vision = {
        "depth": 1 if small else 2,
        "hidden_size": 64 if small else 128,
        "intermediate_size": 256 if small else 512,
        "num_heads": 2,
        "patch_size": PATCH,
        "temporal_patch_size": 2,
        "spatial_merge_size": MERGE,
        "out_hidden_size": width,
        "deepstack_visual_indexes": [0] if small else [0, 1],
    }
    return transformers.Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )


def _save(folder: Path, small: bool = False) -> None:
    import transformers

    torch.manual_seed(0)
    transformers.Qwen3VLForConditionalGeneration(_hf_config(small)).float().save_pretrained(str(folder))
    gc.collect()


def _theirs(folder: Path) -> torch.nn.Module:
    import transformers

    return transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        str(folder), attn_implementation="sdpa", dtype=torch.float32
    )


def _ours(folder: Path) -> torch.nn.Module:
    from vl_model import VLForConditionalGeneration

    return VLForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)


def _sample(g: torch.Generator, length: int) -> list[int]:
    """``length`` ids: a little text, one image run, then text (ids below every special id)."""
    head = torch.randint(0, 150000, (16,), generator=g).tolist()
    tail = torch.randint(0, 150000, (length - 16 - IMAGE_TOKENS - 2,), generator=g).tolist()
    return head + [VISION_START] + [IMAGE] * IMAGE_TOKENS + [VISION_END] + tail


def _batch(rows: list[list[int]], g: torch.Generator) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(rows)
    images = int((input_ids == VISION_START).sum())
    grid = torch.tensor([GRID] * images)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == IMAGE).long(),
        "pixel_values": torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g),
        "image_grid_thw": grid,
    }


def _text_labels(input_ids: torch.Tensor) -> torch.Tensor:
    special = (input_ids == IMAGE) | (input_ids == VISION_START) | (input_ids == VISION_END)
    return input_ids.masked_fill(special, -100)


def _trainer(model: torch.nn.Module, batch: dict[str, torch.Tensor], out: Path, **overrides: Any) -> Any:
    from vl_train.config import OptimConfig, TrainConfig
    from vl_train.trainer import Trainer

    config = TrainConfig(
        optim=OptimConfig(lr=LR, betas=(0.9, 0.999), warmup_steps=0, min_lr_ratio=1.0, max_grad_norm=None),
        max_steps=1000,
        loss_reduction="token",
        bf16=False,
        progress=False,
        tensorboard=False,
        plot=False,
        save_every=0,
        output_dir=str(out),
        **overrides,
    )
    model.train()
    return Trainer(model, config, itertools.repeat(batch))


def _baseline_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.train()

    def step() -> float:
        out = model(**inputs, labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        return float(out.loss.detach())

    return step


def _throughput_row(folder: Path, out: Path, quick: bool) -> Row:
    g = torch.Generator().manual_seed(1)
    batch = _batch([_sample(g, SEQ) for _ in range(ROWS)], g)
    answer = torch.arange(SEQ) >= SEQ - ANSWER
    batch["labels"] = _text_labels(batch["input_ids"]).masked_fill(~answer[None], -100)
    theirs, ours = _theirs(folder), _ours(folder)
    step_theirs = _baseline_step(theirs, batch)
    trainer = _trainer(ours, batch, out)
    want, got = step_theirs(), float(trainer.train_step()["loss"])
    if abs(got - want) > 1e-3 * abs(want):
        raise AssertionError(f"first-step losses differ: transformers {want!r}, ours {got!r}")
    row = compare(
        BENCH,
        f"optimiser step (fwd+bwd+AdamW): {ROWS} rows x {SEQ} tokens, one 224 px image per row, labels on "
        f"the last {ANSWER} of each, hidden 256 x 4 layers, vocab 151936",
        baseline=BASELINE,
        baseline_fn=step_theirs,
        ours_fn=trainer.train_step,
        warmup=1,
        repeat=3 if quick else 5,
    )
    tokens = ROWS * SEQ
    note = (
        f"first-step loss {got:.4f} both; tokens/s: transformers {tokens / row.baseline_ms * 1e3:.0f}, "
        f"ours (Trainer.train_step, token-mean loss) {tokens / row.ours_ms * 1e3:.0f}"
    )
    return Row(row.benchmark, row.case, row.baseline, row.baseline_ms, row.ours_ms, row.device, note)


def _packed_row(length: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    samples = length // SAMPLE
    batch = _batch([[t for _ in range(samples) for t in _sample(g, SAMPLE)]], g)
    batch["segment_ids"] = torch.arange(samples).repeat_interleave(SAMPLE)[None]
    labels = _text_labels(batch["input_ids"])
    answer = torch.arange(length) % SAMPLE >= SAMPLE - SAMPLE // 16  # last 1/16 of each sample
    batch["labels"] = labels.masked_fill(~answer[None], -100)
    return batch


def _measured(fn: Callable[[], dict[str, Any]]) -> tuple[float, float, float]:
    """``(loss, ms, peak MB)`` of one call of a ``train_step`` (timed with the memory counter attached)."""
    out: dict[str, Any] = {}

    def step() -> None:
        out.update(fn())

    start = time.perf_counter()
    peak = peak_tensor_mb(step)
    return float(out["loss"]), (time.perf_counter() - start) * 1e3, peak


def _memory_row(folder: Path, out: Path, quick: bool) -> Row:
    length = 8192 if quick else 32768
    batch = _packed_row(length, torch.Generator().manual_seed(2))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    plain = _trainer(_ours(folder), batch, out / "plain", activation_checkpointing=False, loss_chunk_size=labelled)
    loss_plain, ms_plain, mem_plain = _measured(plain.train_step)
    del plain
    gc.collect()
    lean = _trainer(_ours(folder), batch, out / "lean", activation_checkpointing=True, loss_chunk_size=MEMORY_CHUNK)
    loss_lean, ms_lean, mem_lean = _measured(lean.train_step)
    if abs(loss_lean - loss_plain) > 1e-4 * abs(loss_plain):
        raise AssertionError(f"losses differ: checkpointed+chunked {loss_lean!r}, plain {loss_plain!r}")
    chunks = -(-labelled // MEMORY_CHUNK)
    case = (
        f"one packed step: 1 row x {length} tokens ({length // SAMPLE} samples of {SAMPLE}, one 224 px image "
        f"each, {labelled} labelled), hidden 128 x 2 layers, vocab 151936: checkpointing + loss chunk "
        f"{MEMORY_CHUNK} ({chunks} chunks) vs neither (one {labelled}-token chunk)"
    )
    note = (
        f"first-step loss {loss_lean:.4f} both; peak tensor memory of the step: without {mem_plain:.0f} MB, "
        f"with {mem_lean:.0f} MB ({mem_plain / mem_lean:.1f}x less); one step per side, timed with the "
        "memory counter attached" + ("; quick: 8K tokens (the full run: 32K)" if quick else "")
    )
    return Row(BENCH, case, "ours without activation checkpointing, unchunked loss", ms_plain, ms_lean, "cpu", note)


def run(quick: bool) -> list[Row]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("bench_vl_train: transformers is not installed; no baseline to compare against")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        folder, small, out = Path(tmp) / "ckpt", Path(tmp) / "ckpt-small", Path(tmp) / "runs"
        _save(folder)
        rows = [_throughput_row(folder, out / "throughput", quick)]
        gc.collect()
        _save(small, small=True)
        rows.append(_memory_row(small, out / "memory", quick))
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row.case}: {row.baseline_ms:.1f} ms vs {row.ours_ms:.1f} ms = {row.speedup:.2f}x ({row.note})")
