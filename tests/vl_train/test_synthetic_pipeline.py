"""The synthetic dataset through the data pipeline: rendered, packed and trained on by a tiny model."""

from __future__ import annotations

import torch
from _data_helpers import make_processor, tiny_model

from vl_train.data import TASK_NAMES, SampleRenderer, SyntheticDataset, pack


def test_every_task_renders_packs_and_gives_a_finite_loss() -> None:
    processor = make_processor()
    renderer = SampleRenderer(processor, max_length=1024, overlong="drop", policy="fail")
    dataset = SyntheticDataset(
        "train", size=2 * len(TASK_NAMES), seed=3, image_size_range=(48, 64), video_frames=(4, 4)
    )
    rendered = [r for r in renderer.iter(dataset) if r is not None]
    assert len(rendered) == len(dataset)
    assert {dataset[i]["task"] for i in range(len(dataset))} == set(TASK_NAMES)
    assert all(r.num_labels > 0 for r in rendered)
    batches = pack(rendered, 1024, pad_token_id=processor.tokenizer.pad_token_id or 0)
    model = tiny_model(processor)
    for batch in batches:
        out = model(**batch)
        assert torch.isfinite(out.loss)
