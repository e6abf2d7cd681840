"""Question: how much faster is vl_rope.get_rope_index than transformers' Qwen3-VL get_rope_index?

Cases (issue: at least 5x on the batch, moonshot 10x):
- 32 rows x ~7K tokens, each row with 38 images of varied size and 8 videos split into
  temporal patches with timestamp text between them, left padding;
- one 256K-token video (3,640 temporal patches of 64 tokens, timestamps between them).

Both sides get the same tensors and produce identical outputs (checked before timing).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import Row, compare

IMAGE, VIDEO, START, END, PAD = 151655, 151656, 151652, 151653, 151643


def _row(rng: random.Random, images: list[list[int]], videos: list[list[int]], n_img: int, n_vid: int) -> list[int]:
    ids: list[int] = [rng.randrange(10, 5000) for _ in range(rng.randint(20, 60))]
    kinds = ["image"] * n_img + ["video"] * n_vid
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "image":
            g = [1, 2 * rng.randint(4, 12), 2 * rng.randint(4, 12)]
            images.append(g)
            ids += [START] + [IMAGE] * (g[1] * g[2] // 4) + [END]
        else:
            g = [rng.randint(2, 8), 16, 16]
            videos.append(g)
            for _ in range(g[0]):
                ids += [rng.randrange(10, 5000) for _ in range(6)] + [START] + [VIDEO] * 64 + [END]
        ids += [rng.randrange(10, 5000) for _ in range(rng.randint(10, 60))]
    return ids


def make_batch(rows: int, n_img: int, n_vid: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    images: list[list[int]] = []
    videos: list[list[int]] = []
    seqs = [_row(rng, images, videos, n_img, n_vid) for _ in range(rows)]
    width = max(map(len, seqs))
    ids = torch.full((rows, width), PAD, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    mm = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": mm,
        "image_grid_thw": torch.tensor(images) if images else None,
        "video_grid_thw": torch.tensor(videos) if videos else None,
    }


def make_long_video(patches: int = 3640) -> dict[str, torch.Tensor]:
    one = [11, 12, 13, 14, 15, 16, START] + [VIDEO] * 64 + [END]
    ids = torch.tensor([[1, 2, 3] + one * patches + [4, 5]])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": 2 * (ids == VIDEO).long(),
        "image_grid_thw": None,
        "video_grid_thw": torch.tensor([[patches, 16, 16]]),
    }


def _transformers_fn(batch: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    class Stub:
        get_rope_index = Qwen3VLModel.get_rope_index
        get_vision_position_ids = Qwen3VLModel.get_vision_position_ids
        config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2))

    stub = Stub()
    return lambda: stub.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        batch["image_grid_thw"],
        batch["video_grid_thw"],
        batch["attention_mask"],
    )


def _ours_fn(batch: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    from vl_rope import get_rope_index

    return lambda: get_rope_index(
        batch["input_ids"],
        image_grid_thw=batch["image_grid_thw"],
        video_grid_thw=batch["video_grid_thw"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
    )


def run(quick: bool) -> list[Row]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("bench_rope_index: transformers is not installed; no baseline to compare against")
        return []
    cases = [
        ("32 rows x ~7K tokens, 38 images + 8 videos per row", make_batch(32, 38, 8)),
        ("1 row, 256K-token video (3,640 temporal patches)", make_long_video()),
    ]
    rows = []
    for name, batch in cases:
        base, ours = _transformers_fn(batch), _ours_fn(batch)
        want, got = base(), ours()
        if not (torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])):
            raise AssertionError(f"outputs differ on case {name!r}")
        tokens = int(batch["attention_mask"].sum())
        rows.append(
            compare(
                "get_rope_index (qwen3_vl)",
                f"{name}; {tokens:,} tokens",
                baseline="transformers Qwen3VLModel.get_rope_index",
                baseline_fn=base,
                ours_fn=ours,
                warmup=1,
                repeat=3 if quick else 7,
            )
        )
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row.case}: {row.baseline_ms:.1f} ms vs {row.ours_ms:.1f} ms = {row.speedup:.1f}x")
