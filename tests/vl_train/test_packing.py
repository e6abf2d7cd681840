"""Packing and collation: layout checks and the key property, packed loss == sum of per-sample losses."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from _data_helpers import image, image_sample, make_processor, text_sample, tiny_model, video_sample

from vl_train.data.collate import collate
from vl_train.data.packing import first_fit, iter_packed, pack, pack_rows
from vl_train.data.render import IGNORE_INDEX, RenderedSample, SampleRenderer


@pytest.fixture(scope="module")
def processor() -> Any:
    return make_processor()


@pytest.fixture(scope="module")
def samples(processor: Any) -> list[RenderedSample]:
    raw = [
        text_sample("t0", answer="yes"),
        image_sample("i0", reasoning="it is red"),
        video_sample("v0"),
        image_sample("i1", img=image(24, 16, 3), answer="blue"),
        text_sample("t1", answer="no it is not", question="is the cat left of the dog?"),
        image_sample("i2", img=image(32, 16, 4), answer="green circle"),
    ]
    renderer = SampleRenderer(processor)
    out = [renderer(s) for s in raw]
    assert all(o is not None for o in out)
    return out  # type: ignore[return-value]


@pytest.fixture(scope="module")
def model(processor: Any) -> Any:
    return tiny_model(processor)


def test_first_fit_invariants_and_example() -> None:
    assert first_fit([5, 4, 3, 2, 6, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    rng = random.Random(0)
    for _ in range(50):
        cap = rng.randint(5, 40)
        lengths = [rng.randint(1, cap) for _ in range(rng.randint(1, 30))]
        rows = first_fit(lengths, cap)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in r) <= cap for r in rows)
        # first fit: when item i was placed, no earlier row had room for it
        for r, row in enumerate(rows):
            for i in row:
                for earlier in rows[:r]:
                    used = sum(lengths[j] for j in earlier if j < i)
                    assert used + lengths[i] > cap
    with pytest.raises(ValueError, match="item 1 has length 9"):
        first_fit([3, 9], 8)


def test_pack_rows_layout(samples: list[RenderedSample]) -> None:
    rows = [[0, 3], [1]]
    width = len(samples[0]) + len(samples[3]) + 2
    batch = pack_rows(samples, rows, width, pad_token_id=7)
    n0, n3, n1 = len(samples[0]), len(samples[3]), len(samples[1])
    seg = batch["segment_ids"]
    assert seg[0].tolist() == [0] * n0 + [1] * n3 + [-1, -1]
    assert seg[1].tolist() == [0] * n1 + [-1] * (width - n1)
    assert torch.equal(batch["attention_mask"], (seg >= 0).long())
    assert torch.equal(batch["input_ids"][0, n0 : n0 + n3], samples[3].input_ids)
    assert batch["input_ids"][0, -1] == 7 and batch["labels"][0, -1] == IGNORE_INDEX
    assert batch["labels"][0, n0] == IGNORE_INDEX  # a sample's first token is never a target
    # visual inputs in row-major sample order: sample 3's image, then sample 1's
    assert torch.equal(batch["image_grid_thw"], torch.cat([samples[3].image_grid_thw, samples[1].image_grid_thw]))  # type: ignore[list-item]
    assert "video_grid_thw" not in batch
    with pytest.raises(ValueError, match="row 0 holds"):
        pack_rows(samples, [[0, 1]], 10, pad_token_id=0)


def test_packed_loss_and_logits_equal_unpacked(samples: list[RenderedSample], model: Any, processor: Any) -> None:
    alone_loss, alone_logits = [], []
    with torch.no_grad():
        for s in samples:
            out = model(**s.as_batch(), num_items_in_batch=1, return_logits=True)
            alone_loss.append(out.loss)
            alone_logits.append(out.logits[0])
        batches = pack(samples, 80, pad_token_id=processor.tokenizer.pad_token_id, rows_per_batch=2)
        assert len(batches) >= 2 and any(int(b["segment_ids"].max()) >= 1 for b in batches)
        packed_total = torch.zeros(())
        rows = first_fit([len(s) for s in samples], 80)
        for b, batch in enumerate(batches):
            out = model(**batch, num_items_in_batch=1, return_logits=True)
            packed_total += out.loss
            for r, row in enumerate(rows[2 * b : 2 * b + 2]):
                for k, i in enumerate(row):
                    got = out.logits[r][batch["segment_ids"][r] == k]
                    torch.testing.assert_close(got, alone_logits[i], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed_total, torch.stack(alone_loss).sum(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("with_segments", [True, False])
def test_collate_loss_and_logits_equal_unpacked(
    samples: list[RenderedSample], model: Any, side: str, with_segments: bool
) -> None:
    batch = collate(samples, pad_token_id=0, padding_side=side, pad_to_multiple_of=8, with_segment_ids=with_segments)  # type: ignore[arg-type]
    assert batch["input_ids"].shape[1] % 8 == 0 and ("segment_ids" in batch) == with_segments
    with torch.no_grad():
        out = model(**batch, num_items_in_batch=1, return_logits=True)
        total = torch.zeros(())
        for r, s in enumerate(samples):
            alone = model(**s.as_batch(), num_items_in_batch=1, return_logits=True)
            total += alone.loss
            got = out.logits[r][batch["attention_mask"][r].bool()]
            torch.testing.assert_close(got, alone.logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, total, rtol=1e-5, atol=1e-4)


def test_iter_packed_streams_every_sample_once(samples: list[RenderedSample]) -> None:
    many = samples * 5
    batches = list(iter_packed(iter(many), 64, pad_token_id=0, rows_per_batch=3, buffer_size=7))
    assert all(b["input_ids"].shape == (3, 64) for b in batches[:-1]) and batches[-1]["input_ids"].shape[0] <= 3
    firsts = sum(int((b["segment_ids"] >= 0).sum()) for b in batches)
    assert firsts == sum(len(s) for s in many)
    n_segments = sum(int((b["segment_ids"].max(1).values + 1).sum()) for b in batches)
    assert n_segments == len(many)
    with pytest.raises(ValueError, match="rows_per_batch"):
        next(iter_packed(iter(many), 64, pad_token_id=0, rows_per_batch=0))
