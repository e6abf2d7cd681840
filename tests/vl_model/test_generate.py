"""Greedy generation equals transformers' Qwen3-VL token for token (KV cache and MRoPE deltas)."""

from __future__ import annotations

import pytest
import torch
from _core_helpers import batch, saved_hf

from vl_model import VLForConditionalGeneration


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def pair(request, tmp_path_factory):
    ref, folder = saved_hf(tmp_path_factory.mktemp("gen"), request.param)
    return ref, VLForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize("videos", [True, False], ids=["image+video", "image"])
def test_greedy_tokens_match(pair, videos: bool) -> None:
    ref, ours = pair
    inputs = batch(videos=videos, left_pad=3)
    kw = {"max_new_tokens": 5, "do_sample": False}
    with torch.no_grad():
        expected = ref.generate(**inputs, **kw)
        got = ours.generate(**inputs, **kw)
    assert torch.equal(got, expected)


def test_greedy_without_mask(pair) -> None:
    ref, ours = pair
    inputs = batch(videos=False, left_pad=0)
    inputs = {k: v[:1] if k in ("input_ids", "mm_token_type_ids") else v for k, v in inputs.items()}
    inputs.pop("attention_mask")
    inputs["pixel_values"] = inputs["pixel_values"][:24]
    inputs["image_grid_thw"] = inputs["image_grid_thw"][:1]
    kw = {"max_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        assert torch.equal(ours.generate(**inputs, **kw), ref.generate(**inputs, **kw))


def test_manual_decode_uses_rope_deltas(pair) -> None:
    """A prefill then one cached step without position ids equals the full forward's last logits."""
    _, ours = pair
    inputs = batch(videos=False, left_pad=0)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    nxt = torch.tensor([[5], [6]])
    with torch.no_grad():
        pre = ours(**inputs, use_cache=True)
        step = ours(
            input_ids=nxt,
            attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
            past_key_values=pre.past_key_values,
            use_cache=True,
        )
        full_inputs = dict(
            inputs, input_ids=torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1)
        )
        full_inputs.pop("mm_token_type_ids")
        full = ours(**full_inputs)
    assert torch.allclose(step.logits[:, -1], full.logits[:, -1], atol=1e-5)
