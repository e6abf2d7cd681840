"""Packed rows: the block-causal mask equals transformers' mask-function path and is safe at padding; SDPA's
per-sample spans equal the dense mask (outputs and gradients), also inside the model."""

from __future__ import annotations

import pytest
import torch
from _core_helpers import VISION_START, saved_hf
from transformers.masking_utils import create_causal_mask

from vl_model import VLForConditionalGeneration, VLTextConfig
from vl_model._attention import (
    eager_attention,
    packed_causal_mask,
    packed_sdpa_attention,
    segment_mask_function,
    segment_spans,
)

PAD = -1


def _rows(seed: int, batch: int = 3, length: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed rows: runs of segment ids 0, 1, 2, ... then right padding of random length."""
    gen = torch.Generator().manual_seed(seed)
    segments = torch.full((batch, length), PAD)
    for b in range(batch):
        at, seg = 0, 0
        end = length - int(torch.randint(0, 9, (1,), generator=gen))
        while at < end:
            run = int(torch.randint(1, 12, (1,), generator=gen))
            segments[b, at : min(at + run, end)] = seg
            at, seg = at + run, seg + 1
    return segments, (segments != PAD).long()


def _reference(segments: torch.Tensor, attention_mask: torch.Tensor, implementation: str) -> torch.Tensor:
    config = VLTextConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    config._attn_implementation = implementation
    embeds = torch.zeros(*segments.shape, 32)
    mask = create_causal_mask(
        config=config,
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=None,
        and_mask_function=segment_mask_function(segments),
    )
    if mask.dtype != torch.bool:  # eager masks are additive
        mask = mask == 0
    return mask.expand(segments.shape[0], 1, -1, -1)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_mask_function_path_at_real_tokens(seed: int, implementation: str) -> None:
    segments, attention_mask = _rows(seed)
    assert (attention_mask == 0).any(), "the rows must hold padding"
    got = packed_causal_mask(segments, attention_mask)
    expected = _reference(segments, attention_mask, implementation)
    real = attention_mask.bool()
    assert got.shape == expected.shape and got.dtype == torch.bool
    assert torch.equal(got[:, 0][real], expected[:, 0][real])


def test_padding_queries_see_only_themselves() -> None:
    segments, attention_mask = _rows(3)
    mask = packed_causal_mask(segments, attention_mask)[:, 0]
    assert bool(mask.any(-1).all()), "no row may be fully masked (SDPA gives NaN there)"
    pad = ~attention_mask.bool()
    assert torch.equal(mask[pad], torch.eye(segments.shape[1], dtype=torch.bool).expand(3, -1, -1)[pad])


def test_without_padding_is_block_causal() -> None:
    segments = torch.tensor([[0, 0, 0, 1, 1, 2]])
    mask = packed_causal_mask(segments)[0, 0].long()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ]
    )
    assert torch.equal(mask, expected)


def test_padded_packed_row_trains_with_finite_gradients(tmp_path) -> None:
    """Right padding after packed samples: same logits as the samples alone, finite gradients."""
    _, folder = saved_hf(tmp_path, False)
    model = VLForConditionalGeneration.from_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(10, VISION_START, (1, n), generator=gen) for n in (7, 5))  # text only
    ids = torch.cat([first, second, torch.zeros(1, 4, dtype=torch.long)], 1)
    segments = torch.tensor([[0] * 7 + [1] * 5 + [PAD] * 4])
    attention_mask = (segments != PAD).long()
    with torch.no_grad():
        packed = model(input_ids=ids, segment_ids=segments, attention_mask=attention_mask).logits[0, :12]
        apart = torch.cat([model(input_ids=first).logits[0], model(input_ids=second).logits[0]])
    assert torch.allclose(packed, apart, atol=1e-4)
    labels = ids.masked_fill(attention_mask == 0, -100)
    model.train()
    model(input_ids=ids, segment_ids=segments, attention_mask=attention_mask, labels=labels).loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_segment_spans_tile_each_row() -> None:
    segments = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert segment_spans(segments) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    # padding is a span of its own even where it carries a sample's id (left padding here)
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert segment_spans(segments, padding) == [[(0, 2), (2, 3), (3, 5), (5, 6)], [(0, 6)]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_span_attention_equals_dense_mask(seed: int, dtype: torch.dtype) -> None:
    """Per-sample SDPA == eager attention under the dense block-causal mask at real tokens: odd sizes, right
    padding, batch 3, GQA, gradients."""
    gen = torch.Generator().manual_seed(seed)
    segments, attention_mask = _rows(seed)
    batch, length = segments.shape
    q = torch.randn(batch, 6, length, 10, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(batch, 2, length, 10, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(batch, 2, length, 10, generator=gen).to(dtype).requires_grad_()
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    module.training = False
    spans = segment_spans(segments, attention_mask)
    got, _ = packed_sdpa_attention(module, q, k, v, None, scaling=0.3, segment_spans=spans)
    want, _ = eager_attention(module, q, k, v, packed_causal_mask(segments, attention_mask), scaling=0.3)
    real = attention_mask.bool()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == want.shape == (batch, length, 6, 10)
    assert torch.allclose(got[real].float(), want[real].float(), atol=tol, rtol=tol)
    grad = torch.randn(got.shape, generator=gen).to(dtype) * real[..., None, None]  # padding is never scored
    mine = torch.autograd.grad(got, (q, k, v), grad)
    theirs = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(mine, theirs, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=5 * tol, rtol=5 * tol)


def test_span_attention_refuses_a_mask() -> None:
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="segment_spans instead of an attention mask"):
        packed_sdpa_attention(torch.nn.Module(), q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))


def test_model_sdpa_spans_equal_eager_mask(tmp_path, monkeypatch) -> None:
    """A packed unpadded row through the model: SDPA (spans, no mask) == eager (dense mask), logits and grads."""
    import vl_model._decoder as decoder

    calls = []
    monkeypatch.setattr(
        decoder, "packed_sdpa_attention", lambda *a, **k: calls.append(1) or packed_sdpa_attention(*a, **k)
    )
    _, folder = saved_hf(tmp_path, False)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, VISION_START, (2, 19), generator=gen)
    segments = torch.tensor([[0] * 7 + [1] * 5 + [2] * 7, [0] * 19])
    labels = ids.clone()
    results = []
    for implementation in ("sdpa", "eager"):
        model = VLForConditionalGeneration.from_pretrained(folder, attn_implementation=implementation).train()
        out = model(input_ids=ids, segment_ids=segments, labels=labels)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads))
    (logits, grads), (ref_logits, ref_grads) = results
    assert calls, "SDPA on packed rows must take the span path"
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], atol=1e-4, rtol=1e-3), name
