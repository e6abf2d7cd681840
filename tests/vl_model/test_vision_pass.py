"""One tower pass per forward (``uniform_vision_pass``), for the core and the composed model.

A sharded tower needs every rank to run it the same number of times: images and videos go through it
together, and a forward without pixels runs a zero-weighted placeholder image. The placeholder must
change nothing (outputs, losses, gradients, generated tokens) while every tower parameter gets a
gradient (an exact zero), so that FSDP2's reduce-scatter runs for every unit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from _compose_helpers import IMAGE, TOKEN_IDS, VEND, VIDEO, VSTART, lm_config, qwen3_vl_twin, vision_config

from vl_model import VLConfig, VLForConditionalGeneration, compose
from vl_model._vision_pass import encode_visual


def _models() -> dict[str, Any]:
    """A core model and a composed model of the same sizes."""
    torch.manual_seed(0)
    composed = compose(vision_config(), lm_config("qwen3"), position_style="mrope", **TOKEN_IDS)
    data = qwen3_vl_twin(composed).config.to_dict()
    torch.manual_seed(0)
    return {"core": VLForConditionalGeneration(VLConfig.from_qwen3_vl(data)), "composed": composed}


MODELS = _models()


def _image_and_video_batch() -> dict[str, torch.Tensor]:
    """One row: an image (grid (1, 4, 4) -> 4 tokens), then a video of two temporal patches (4 tokens each)."""
    g = torch.Generator().manual_seed(1)
    run = lambda token: [VSTART] + [token] * 4 + [VEND]
    row = [1, *run(IMAGE), 5, *run(VIDEO), 6, *run(VIDEO), 7]
    return {
        "input_ids": torch.tensor([row]),
        "attention_mask": torch.ones(1, len(row), dtype=torch.long),
        "pixel_values": torch.randn(16, 96, generator=g),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "pixel_values_videos": torch.randn(32, 96, generator=g),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
    }


def _tower(model: Any) -> torch.nn.Module:
    return model.vision_tower()


@contextlib.contextmanager
def _count_tower_calls(model: Any) -> Iterator[list[int]]:
    calls: list[int] = []
    handle = _tower(model).blocks[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["core", "composed"])
def test_text_only_forward_with_the_placeholder_changes_nothing_and_reaches_every_tower_parameter(name: str) -> None:
    model = MODELS[name].train()
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    weight = model.output_weight()
    results = []
    for uniform in (False, True):
        model.uniform_vision_pass = uniform
        model.zero_grad(set_to_none=True)
        hidden = model.forward_hidden(input_ids=ids).last_hidden_state
        (hidden @ weight.T).logsumexp(-1).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if n.startswith(("visual", "model.visual"))}
        results.append((hidden.detach(), grads))
    model.uniform_vision_pass = False
    (plain, plain_grads), (anchored, anchored_grads) = results
    assert torch.equal(plain, anchored)
    assert all(g is None for g in plain_grads.values())
    assert anchored_grads and all(g is not None and not g.any() for g in anchored_grads.values())


@pytest.mark.parametrize("name", ["core", "composed"])
def test_images_and_videos_go_through_the_tower_once(name: str) -> None:
    model = MODELS[name].eval()
    batch = _image_and_video_batch()
    with _count_tower_calls(model) as calls, torch.no_grad():
        model.forward_hidden(**batch)
    assert len(calls) == 1
    tower = _tower(model)
    together = encode_visual(
        tower, batch["pixel_values"], batch["image_grid_thw"], batch["pixel_values_videos"], batch["video_grid_thw"]
    )
    with torch.no_grad():
        image, video = (
            tower(batch["pixel_values"], batch["image_grid_thw"]),
            tower(batch["pixel_values_videos"], batch["video_grid_thw"]),
        )
    assert together.images is not None and together.videos is not None
    for got, want in ((together.images, image), (together.videos, video)):
        torch.testing.assert_close(got.merged, want.merged, rtol=1e-5, atol=1e-6)
        for a, b in zip(got.deepstack, want.deepstack, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["core", "composed"])
def test_the_placeholder_runs_only_without_pixels_and_not_while_decoding(name: str) -> None:
    model = MODELS[name].eval()
    model.uniform_vision_pass = True
    try:
        ids = torch.tensor([[1, 2, 3, 4]])
        with _count_tower_calls(model) as calls, torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        assert len(calls) == 1  # the prefill only
        with _count_tower_calls(model) as calls, torch.no_grad():
            model.forward_hidden(**_image_and_video_batch())
        assert len(calls) == 1  # real pixels: no placeholder on top
    finally:
        model.uniform_vision_pass = False


def test_generation_encodes_the_pixels_in_the_prefill_under_uniform_vision_pass() -> None:
    # generate's own pre-encoding (get_image_features, then get_video_features) would make two passes
    model = MODELS["core"].eval()
    batch = _image_and_video_batch()
    want = model.generate(**batch, max_new_tokens=3, do_sample=False)
    model.uniform_vision_pass = True
    try:
        with _count_tower_calls(model) as calls:
            got = model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        model.uniform_vision_pass = False
    assert len(calls) == 1
    assert torch.equal(got, want)
