"""PackedStream: the same batches as the plain pipeline, and an exact resume from its state."""

from __future__ import annotations

import io
import itertools
from typing import Any

import pytest
import torch
from _data_helpers import make_processor

from vl_train.data.mixture import MixtureSampler
from vl_train.data.packing import iter_packed
from vl_train.data.render import SampleRenderer
from vl_train.data.stream import PackedStream
from vl_train.data.synthetic import SyntheticDataset

MAX_LENGTH, ROWS, BUFFER = 384, 2, 7


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def _mixture(seed: int = 1) -> MixtureSampler:
    sources = {
        "a": SyntheticDataset("train", size=7, seed=3, image_size_range=(48, 56), video_frames=(2, 2)),
        "b": SyntheticDataset("train", size=5, seed=4, image_size_range=(48, 56), video_frames=(2, 2)),
    }
    return MixtureSampler(sources, {"a": 2.0, "b": 1.0}, seed=seed)


def _stream(processor, packing: bool = True, buffer_size: int = BUFFER) -> PackedStream:
    renderer = SampleRenderer(processor, max_length=MAX_LENGTH, overlong="drop", policy="fail")
    pad = int(processor.tokenizer.pad_token_id or 0)
    return PackedStream(
        _mixture(),
        renderer,
        max_length=MAX_LENGTH,
        pad_token_id=pad,
        rows_per_batch=ROWS,
        packing=packing,
        buffer_size=buffer_size,
    )


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Same tensors; ``sample_ids`` (the stream's, for error messages) equal when both have them."""
    assert a.keys() - {"sample_ids"} == b.keys() - {"sample_ids"}
    for key in a.keys() - {"sample_ids"}:
        assert torch.equal(a[key], b[key]), key
    if "sample_ids" in a and "sample_ids" in b:
        assert a["sample_ids"] == b["sample_ids"]


def test_batches_equal_the_plain_pipeline(processor):
    renderer = SampleRenderer(processor, max_length=MAX_LENGTH, overlong="drop", policy="fail")
    pad = int(processor.tokenizer.pad_token_id or 0)
    plain = iter_packed(
        renderer.iter(_mixture()), MAX_LENGTH, pad_token_id=pad, rows_per_batch=ROWS, buffer_size=BUFFER
    )
    for got, want in zip(itertools.islice(_stream(processor), 6), itertools.islice(plain, 6), strict=True):
        _same(got, want)
        assert got["input_ids"].shape == (ROWS, MAX_LENGTH)
        rows = got["sample_ids"]
        assert len(rows) == ROWS and all(isinstance(i, str) for row in rows for i in row)
        assert sum(len(row) for row in rows) == int(got["segment_ids"].max(1).values.add(1).sum())


# buffer 7: samples wait in the packing buffer at the save; 9: a packed batch waits unyielded
@pytest.mark.parametrize(
    ("packing", "buffer_size", "pending"), [(True, 7, "buffer"), (True, 9, "ready"), (False, 7, "")]
)
def test_resume_gives_the_same_next_batches(processor, packing, buffer_size, pending):
    stream = _stream(processor, packing, buffer_size)
    for _ in range(5):
        next(stream)
    buffer = io.BytesIO()
    torch.save(stream.state_dict(), buffer)  # plain data: loads with weights_only (as checkpoints do)
    if pending:
        assert stream.state_dict()[pending], f"the test should save with samples pending in {pending}"
    want = [next(stream) for _ in range(3)]

    fresh = _stream(processor, packing, buffer_size)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.batches == 5
    for got, ref in zip([next(fresh) for _ in range(3)], want, strict=True):
        assert torch.equal(got["input_ids"], ref["input_ids"])
        _same(got, ref)
    assert fresh.state_dict() == stream.state_dict()


def test_bad_sizes_are_rejected(processor):
    with pytest.raises(ValueError, match="got 0, 64 and 8"):
        PackedStream(_mixture(), None, max_length=8, pad_token_id=0, rows_per_batch=0)
