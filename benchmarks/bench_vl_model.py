"""Questions: is vl_model's VLForConditionalGeneration faster than transformers' Qwen3-VL on CPU?

Both models load the same official-format checkpoint: a transformers ``Qwen3VLConfig`` (text:
hidden 512, 8 layers, 8 heads, 4 KV heads, head_dim 64, intermediate 1536, vocab 151936,
untied embeddings; vision: depth 4, width 256, 4 heads, intermediate 1024, out 512, DeepStack taps
[1, 2, 3], patch 16, merge 2), random init with a fixed seed, ``save_pretrained`` into a temporary
folder, then ``Qwen3VLForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")``
and ``VLForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")``; float32.

1. Training step (forward + backward, SFT-style labels on the last 256 tokens only) on one row of
   1024 tokens with two 448 px images (grid [1, 28, 28], 196 merged tokens each), ``model.train()``
   (every dropout is 0). Losses are checked equal (rtol 1e-4) before timing. Our model is called with
   ``return_logits=False`` and projects the vocabulary only at labelled positions (``logits=None``; its
   default forward returns all logits, as transformers does); transformers projects all 1024.
2. Greedy decoding (``generate(do_sample=False)``, batch 1) from a ~300-token prompt with one 448 px
   image. The generated ids are checked identical before timing. The ratio is over whole
   ``generate`` calls; the note gives tokens/s overall and decode-only (the time of a
   ``max_new_tokens=1`` call, i.e. prefill + first token, taken off).

Peak memory (in the note) is the peak of live tensor storage during one call, counted by a dispatch
mode (``benchmarks/_memory.py``): deterministic, unlike RSS on a shared machine.
"""

from __future__ import annotations

import gc
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import Row, compare, time_ms
from benchmarks._memory import peak_tensor_mb

BENCH = "VL model (CPU)"
BASELINE = "transformers Qwen3VLForConditionalGeneration (sdpa)"
VOCAB = 151936
IMAGE, VISION_START, VISION_END = 151655, 151652, 151653  # Qwen3VLConfig defaults
PATCH, MERGE = 16, 2
PATCH_DIM = 3 * 2 * PATCH * PATCH
GRID = [1, 448 // PATCH, 448 // PATCH]  # one 448 px image: 784 patches, 196 merged tokens
IMAGE_TOKENS = GRID[0] * GRID[1] * GRID[2] // MERGE**2
SEQ, ANSWER = 1024, 256  # training row length and labelled tail
PROMPT_TEXT = 100  # text tokens around the image in the decoding prompt


def _hf_config() -> Any:
    import transformers

    text = {
        "vocab_size": VOCAB,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [12, 10, 10]},
    }
    vision = {
        "depth": 4,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_heads": 4,
        "patch_size": PATCH,
        "temporal_patch_size": 2,
        "spatial_merge_size": MERGE,
        "out_hidden_size": 512,
        "deepstack_visual_indexes": [1, 2, 3],
    }
    return transformers.Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )


def _models(folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(theirs, ours)`` loaded from the same checkpoint, written to ``folder`` first."""
    import transformers

    from vl_model import VLForConditionalGeneration

    torch.manual_seed(0)
    transformers.Qwen3VLForConditionalGeneration(_hf_config()).float().save_pretrained(str(folder))
    gc.collect()
    theirs = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        str(folder), attn_implementation="sdpa", dtype=torch.float32
    )
    ours = VLForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    return theirs, ours


def _text(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 150000, (n,), generator=g).tolist()  # below every special id


def _image_run() -> list[int]:
    return [VISION_START] + [IMAGE] * IMAGE_TOKENS + [VISION_END]


def _inputs(images: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """One row of ``seq`` tokens: text with ``images`` 448 px images spread through its first part."""
    g = torch.Generator().manual_seed(seed)
    rest = seq - images * (IMAGE_TOKENS + 2)
    pieces = [_text(g, rest // (images + 2))]
    for _ in range(images):
        pieces += [_image_run(), _text(g, rest // (images + 2))]
    ids = [t for p in pieces for t in p]
    ids += _text(g, seq - len(ids))
    input_ids = torch.tensor([ids])
    grid = torch.tensor([GRID] * images)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == IMAGE).long(),
        "pixel_values": torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g),
        "image_grid_thw": grid,
    }


def _step(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, **forward_kwargs: Any
) -> Callable[[], float]:
    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, labels=labels, **forward_kwargs).loss
        loss.backward()
        return float(loss.detach())

    return step


def _generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new: int) -> Callable[[], torch.Tensor]:
    def gen() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    return gen


def _training_row(theirs: torch.nn.Module, ours: torch.nn.Module, quick: bool) -> Row:
    inputs = _inputs(images=2, seq=SEQ, seed=1)
    labels = inputs["input_ids"].clone()
    labels[:, : SEQ - ANSWER] = -100
    for m in (theirs, ours):
        m.train()
    step_theirs, step_ours = _step(theirs, inputs, labels), _step(ours, inputs, labels, return_logits=False)
    want, got = step_theirs(), step_ours()
    if abs(got - want) > 1e-4 * abs(want):
        raise AssertionError(f"training losses differ: transformers {want!r}, ours {got!r}")
    mem_theirs = peak_tensor_mb(step_theirs)
    mem_ours = peak_tensor_mb(step_ours)
    row = compare(
        BENCH,
        f"training step (fwd+bwd): 1 row x {SEQ} tokens, 2 images 448 px, labels on last {ANSWER}, "
        "hidden 512 x 8 layers, vocab 151936",
        baseline=BASELINE,
        baseline_fn=step_theirs,
        ours_fn=step_ours,
        warmup=1,
        repeat=2 if quick else 3,
        note=(
            f"loss {got:.4f} both; peak tensor memory of one step: transformers {mem_theirs:.0f} MB, "
            f"ours {mem_ours:.0f} MB"
        ),
    )
    for m in (theirs, ours):
        m.zero_grad(set_to_none=True)
        m.eval()
    return row


def _decoding_row(theirs: torch.nn.Module, ours: torch.nn.Module, quick: bool) -> Row:
    new = 8 if quick else 32
    inputs = _inputs(images=1, seq=IMAGE_TOKENS + 2 + PROMPT_TEXT, seed=2)
    gen_theirs, gen_ours = _generate(theirs, inputs, new), _generate(ours, inputs, new)
    want, got = gen_theirs(), gen_ours()
    if not torch.equal(got, want):
        raise AssertionError(
            f"greedy ids differ:\ntransformers {want[0, -new:].tolist()}\nours {got[0, -new:].tolist()}"
        )
    made = got.shape[1] - inputs["input_ids"].shape[1]
    row = compare(
        BENCH,
        f"greedy decoding: batch 1, {inputs['input_ids'].shape[1]}-token prompt with one 448 px image, "
        f"{made} new tokens",
        baseline=BASELINE,
        baseline_fn=gen_theirs,
        ours_fn=gen_ours,
        warmup=1,
        repeat=3 if quick else 5,
    )
    pre_theirs = time_ms(_generate(theirs, inputs, 1), warmup=1, repeat=3)
    pre_ours = time_ms(_generate(ours, inputs, 1), warmup=1, repeat=3)

    def rate(total_ms: float, first_ms: float) -> str:
        overall = made / (total_ms / 1e3)
        decode = (made - 1) / (max(total_ms - first_ms, 1e-9) / 1e3)
        return f"{overall:.1f} overall / {decode:.1f} decode-only"

    note = (
        f"ids identical; tokens/s: transformers {rate(row.baseline_ms, pre_theirs)}, "
        f"ours {rate(row.ours_ms, pre_ours)} (decode-only: after the prefill + first token, "
        f"{pre_theirs:.0f} vs {pre_ours:.0f} ms)"
    )
    return Row(row.benchmark, row.case, row.baseline, row.baseline_ms, row.ours_ms, row.device, note)


def run(quick: bool) -> list[Row]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("bench_vl_model: transformers is not installed; no baseline to compare against")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        theirs, ours = _models(Path(tmp))
        rows = [_training_row(theirs, ours, quick), _decoding_row(theirs, ours, quick)]
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row.case}: {row.baseline_ms:.1f} ms vs {row.ours_ms:.1f} ms = {row.speedup:.2f}x ({row.note})")
