"""Parity with transformers' Qwen3-VL / Qwen3-VL-MoE from the same tiny random checkpoint (fp32)."""

from __future__ import annotations

import pytest
import torch
from _core_helpers import batch, masked, rel_err, saved_hf

from vl_model import VLForConditionalGeneration


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def pair(request, tmp_path_factory):
    ref, folder = saved_hf(tmp_path_factory.mktemp("ckpt"), request.param)
    ours = VLForConditionalGeneration.from_pretrained(folder)
    return ref, ours


@pytest.mark.parametrize(
    ("images", "videos"), [(True, True), (True, False), (False, True)], ids=["image+video", "image", "video"]
)
def test_logits_match(pair, images: bool, videos: bool) -> None:
    ref, ours = pair
    inputs = batch(images=images, videos=videos, left_pad=3)
    assert inputs["input_ids"].shape[0] == 2 and bool((inputs["attention_mask"][1] == 0).any())
    with torch.no_grad():
        expected = ref(**inputs).logits
        got = ours(**inputs).logits
    mask = inputs["attention_mask"]
    assert rel_err(masked(got, mask), masked(expected, mask)) < 1e-4


def test_without_mm_token_type_ids(pair) -> None:
    """Our positions come from the placeholder ids when mm_token_type_ids is absent."""
    ref, ours = pair
    inputs = batch()
    with torch.no_grad():
        expected = ref(**inputs).logits
        got = ours(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits
    mask = inputs["attention_mask"]
    assert rel_err(masked(got, mask), masked(expected, mask)) < 1e-4


def test_loss_matches_with_logits_and_labelled_only(pair) -> None:
    """The default forward returns logits with the loss (as transformers); return_logits=False skips them."""
    ref, ours = pair
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, : labels.shape[1] // 2] = -100
    with torch.no_grad():
        expected = ref(**inputs, labels=labels)
        out = ours(**inputs, labels=labels)
        lean = ours(**inputs, labels=labels, return_logits=False)
    mask = inputs["attention_mask"]
    assert rel_err(masked(out.logits, mask), masked(expected.logits, mask)) < 1e-4
    assert lean.logits is None
    for loss in (out.loss, lean.loss):
        assert abs(float(loss) - float(expected.loss)) < 1e-4 * abs(float(expected.loss))


def test_logits_to_keep(pair) -> None:
    _, ours = pair
    inputs = batch()
    with torch.no_grad():
        full = ours(**inputs).logits
        last = ours(**inputs, logits_to_keep=1).logits
    assert last.shape[1] == 1
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_implementations_agree(pair, impl: str) -> None:
    ref, ours = pair
    inputs = batch()
    ours.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            got = ours(**inputs).logits
            expected = ref(**inputs).logits
    finally:
        ours.set_attn_implementation("sdpa")
    mask = inputs["attention_mask"]
    assert rel_err(masked(got, mask), masked(expected, mask)) < 1e-4


def test_attention_switch_reaches_the_tower(pair) -> None:
    _, ours = pair
    ours.set_attn_implementation("eager")
    try:
        assert ours.config.text_config._attn_implementation == "eager"
        assert ours.model.visual.config.attn_implementation == "eager"
    finally:
        ours.set_attn_implementation("sdpa")
    assert ours.model.visual.config.attn_implementation == "sdpa"


def test_router_aux_loss(pair) -> None:
    _, ours = pair
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = ours(**inputs, labels=labels, output_router_logits=True)
    if ours.config.text_config.num_experts == 0:
        assert out.aux_loss is None
        return
    assert out.aux_loss is not None and len(out.router_logits) == 2
    plain = ours(**inputs, labels=labels).loss
    coef = ours.config.text_config.router_aux_loss_coef
    assert torch.allclose(out.loss, plain + coef * out.aux_loss, atol=1e-6)


def _pack(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One row holding the samples back to back (no padding), with segment ids."""
    out = {
        "input_ids": torch.cat([s["input_ids"] for s in samples], 1),
        "segment_ids": torch.cat([torch.full_like(s["input_ids"], i) for i, s in enumerate(samples)], 1),
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples]),
    }
    return out


def _single(seed: int) -> dict[str, torch.Tensor]:
    full = batch(videos=False, left_pad=0, seed=seed)
    row = full["input_ids"][:1]
    keep = full["attention_mask"][0].bool()
    return {
        "input_ids": row[:, keep],
        "pixel_values": full["pixel_values"][:24],
        "image_grid_thw": full["image_grid_thw"][:1],
    }


@pytest.mark.parametrize("by", ["segment_ids", "cu_seqlens"])
def test_packed_rows_equal_unpacked(pair, by: str) -> None:
    _, ours = pair
    samples = [_single(1), _single(2)]
    packed = _pack(samples)
    if by == "cu_seqlens":
        lengths = torch.tensor([0] + [s["input_ids"].shape[1] for s in samples])
        packed["cu_seqlens"] = lengths.cumsum(0)
        packed.pop("segment_ids")
    with torch.no_grad():
        together = ours(**packed).logits[0]
        apart = torch.cat([ours(**s).logits[0] for s in samples])
    assert rel_err(together, apart) < 1e-4


def test_torch_compile_forward_cpu(pair) -> None:
    _, ours = pair
    inputs = batch(videos=False)
    with torch.no_grad():
        eager = ours(**inputs).logits
        compiled = torch.compile(ours, backend="eager")
        got = compiled(**inputs).logits
    assert torch.allclose(got, eager, atol=1e-5)


def test_training_step_backward(pair) -> None:
    _, ours = pair
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    ours.train()
    try:
        ours.zero_grad()
        ours(**inputs, labels=labels).loss.backward()
        grads = [p.grad for p in ours.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads[:5])
        assert ours.model.visual.merger.linear_fc1.weight.grad is not None
    finally:
        ours.zero_grad()
        ours.eval()


def test_flash_varlen_kwargs_from_segments() -> None:
    from vl_model._attention import flash_varlen_kwargs

    out = flash_varlen_kwargs(torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 1, 1]]))
    assert out["cu_seq_lens_q"].tolist() == [0, 2, 5, 6, 10, 12]
    assert out["max_length_q"] == out["max_length_k"] == 4
