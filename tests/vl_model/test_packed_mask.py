"""The block-causal mask of packed rows: equal to transformers' mask-function path, safe at padding."""

from __future__ import annotations

import pytest
import torch
from _core_helpers import VISION_START, saved_hf
from transformers.masking_utils import create_causal_mask

from vl_model import VLForConditionalGeneration, VLTextConfig
from vl_model._attention import packed_causal_mask, segment_mask_function

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
