"""Random multimodal token rows for position-id tests, and the transformers oracle.

Rows mimic what the Qwen-VL processors write: text, then for an image
``<|vision_start|>`` + placeholder run + ``<|vision_end|>``; a Qwen3-VL/GLM video
is split per temporal patch with timestamp text before each patch; Qwen2-VL
videos are one run. Rows are padded on the left or right.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import SimpleNamespace

import torch

IMAGE, VIDEO, VISION_START, VISION_END, PAD = 151655, 151656, 151652, 151653, 151643


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    image_grid_thw: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    second_per_grid_ts: torch.Tensor | None


def _grid(rng: random.Random, m: int, max_side: int, t: int = 1) -> list[int]:
    return [t, m * rng.randint(1, max_side), m * rng.randint(1, max_side)]


class _RowBuilder:
    def __init__(self, rng: random.Random) -> None:
        self.rng, self.ids, self.kinds = rng, [], []  # type: ignore[var-annotated]

    def text(self, n: int) -> None:
        self.ids.extend(self.rng.randrange(10, 5000) for _ in range(n))
        self.kinds.extend([0] * n)

    def run(self, modality: int, n: int) -> None:
        self.ids += [VISION_START] + [IMAGE if modality == 1 else VIDEO] * n + [VISION_END]
        self.kinds += [0] + [modality] * n + [0]


def random_batch(
    seed: int,
    *,
    batch: int = 3,
    split_videos: bool = True,
    m: int = 2,
    max_items: int = 3,
    max_side: int = 4,
    max_t: int = 3,
    padding: str = "left",
    text_only_rows: bool = True,
) -> Batch:
    """A padded batch of random rows with images and videos (grids odd-sized in merged units)."""
    rng = random.Random(seed)
    rows: list[list[int]] = []
    types: list[list[int]] = []
    images: list[list[int]] = []
    videos: list[list[int]] = []
    seconds: list[float] = []
    for r in range(batch):
        row = _RowBuilder(rng)
        row.text(rng.randint(1, 6))
        n_items = 0 if (text_only_rows and r == batch - 1) else rng.randint(1, max_items)
        for _ in range(n_items):
            if rng.random() < 0.5:
                g = _grid(rng, m, max_side)
                images.append(g)
                row.run(1, g[1] * g[2] // (m * m))
            else:
                g = _grid(rng, m, max_side, t=rng.randint(1, max_t))
                videos.append(g)
                seconds.append(rng.choice([0.5, 1.0, 1.5, 2.0, 0.25]))
                if split_videos:
                    for _ in range(g[0]):
                        row.text(rng.randint(2, 4))  # "<1.5 seconds>"
                        row.run(2, g[1] * g[2] // (m * m))
                else:
                    row.run(2, g[0] * g[1] * g[2] // (m * m))
            row.text(rng.randint(0, 5))
        row.text(rng.randint(1, 4))
        rows.append(row.ids)
        types.append(row.kinds)
    width = max(len(x) for x in rows) + rng.randint(0, 3)
    input_ids = torch.full((batch, width), PAD, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    mm = torch.zeros(batch, width, dtype=torch.long)
    for i, (ids, kinds) in enumerate(zip(rows, types, strict=True)):
        sl = slice(width - len(ids), width) if padding == "left" else slice(0, len(ids))
        input_ids[i, sl] = torch.tensor(ids)
        mask[i, sl] = 1
        mm[i, sl] = torch.tensor(kinds)
    return Batch(
        input_ids,
        mask,
        mm,
        torch.tensor(images) if images else None,
        torch.tensor(videos) if videos else None,
        torch.tensor(seconds, dtype=torch.float32) if videos else None,
    )


def oracle(style: str, m: int = 2, tokens_per_second: float = 2):  # type: ignore[no-untyped-def]
    """transformers' own ``get_rope_index`` for a style, bound to a stub model holding only its config."""
    if style == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel as Model
    elif style == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel as Model
    elif style == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel as Model
    else:
        from transformers.models.glm4v.modeling_glm4v import Glm4vModel as Model

    class Stub:
        get_rope_index = Model.get_rope_index
        get_vision_position_ids = Model.get_vision_position_ids

        def __init__(self) -> None:
            self.config = SimpleNamespace(
                vision_config=SimpleNamespace(spatial_merge_size=m, tokens_per_second=tokens_per_second)
            )

    return Stub()
