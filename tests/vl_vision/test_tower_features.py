"""Intermediates, DeepStack, attention backends, activation checkpointing and bf16 of the tower."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from _tower_helpers import GRIDS, random_pixels, randomize, tiny_config

from vl_vision import DeepStack, PatchEmbed, PatchMerger, VarlenLayout, VisionTransformer, varlen_attention


def _tower(**overrides: object) -> VisionTransformer:
    tower = VisionTransformer(tiny_config(**overrides)).double().eval()
    randomize(tower, seed=5)
    return tower


def test_forward_intermediates_equal_block_outputs() -> None:
    tower = _tower(depth=4)
    x = random_pixels(tower.config, GRIDS)
    with torch.no_grad():
        feats = tower.forward_intermediates(x, GRIDS, indices=[0, -1, 2])
        h, rope, layout = tower.embed(x, GRIDS)
        manual = []
        for block in tower.blocks:
            h = block(h, rope, layout)
            manual.append(h)
        out = tower(x, GRIDS)
    torch.testing.assert_close(feats[0], manual[0], rtol=0, atol=0)
    torch.testing.assert_close(feats[1], manual[3], rtol=0, atol=0)
    torch.testing.assert_close(feats[2], manual[2], rtol=0, atol=0)
    torch.testing.assert_close(out.last_hidden_state, manual[3], rtol=0, atol=0)
    assert len(tower.forward_intermediates(x, GRIDS, indices=2)) == 2
    assert len(tower.forward_intermediates(x, GRIDS)) == 4
    with pytest.raises(ValueError, match="outside the 4 blocks"):
        tower.forward_intermediates(x, GRIDS, indices=[4])


def test_deepstack_standalone_matches_tower() -> None:
    tower = _tower(depth=3, deepstack_visual_indexes=[0, 2])
    x = random_pixels(tower.config, GRIDS)
    with torch.no_grad():
        out = tower(x, GRIDS)
        f0, f2 = tower.forward_intermediates(x, GRIDS, indices=[0, 2])
        ds = DeepStack([0, 2], 32, 40).double()
        ds.load_state_dict(tower.deepstack_merger_list.state_dict())
        by_map = ds({0: f0, 2: f2})
        by_list = ds([f0, f2])
    for a, b, c in zip(out.deepstack, by_map, by_list, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no features for"):
        ds({0: f0})
    with pytest.raises(ValueError, match="2 mergers but got 1"):
        ds([f0])


def test_patch_merger_reference() -> None:
    torch.manual_seed(0)
    for post in (False, True):
        merger = PatchMerger(8, 12, 2, postshuffle_norm=post).double()
        randomize(merger, seed=7)
        x = torch.randn(20, 8, dtype=torch.float64)
        if post:
            ref = F.layer_norm(x.reshape(5, 32), (32,), merger.norm.weight, merger.norm.bias, 1e-6)
        else:
            ref = F.layer_norm(x, (8,), merger.norm.weight, merger.norm.bias, 1e-6).reshape(5, 32)
        ref = merger.linear_fc2(F.gelu(merger.linear_fc1(ref)))
        torch.testing.assert_close(merger(x), ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of 4 patches, got 6"):
        merger(torch.randn(6, 8, dtype=torch.float64))


def test_patch_embed_equals_conv3d() -> None:
    embed = PatchEmbed(3, 16, 4, 2).double()
    x = torch.randn(7, 3 * 2 * 4 * 4, dtype=torch.float64)
    ref = embed.proj(x.view(7, 3, 2, 4, 4)).view(7, 16)
    torch.testing.assert_close(embed(x), ref, rtol=0, atol=1e-12)


def _block_diagonal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = seg[:, None] == seg[None, :]
    scores = torch.einsum("nhd,mhd->hnm", q, k) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hnm,mhd->nhd", probs, v)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", [[5, 3, 5, 7, 3], [6], [4, 4, 4], [1, 9, 2]])
def test_varlen_attention_block_diagonal(backend: str, lengths: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    n = sum(lengths)
    q, k, v = (torch.randn(n, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    layout = VarlenLayout.from_lengths(lengths, "cpu")
    assert layout.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    got = varlen_attention(q, k, v, layout, backend=backend)
    torch.testing.assert_close(got, _block_diagonal_reference(q, k, v, lengths), rtol=0, atol=1e-12)


def test_varlen_attention_rejects_wrong_layout() -> None:
    q = torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match="covers 6 tokens but q has 5 rows"):
        varlen_attention(q, q, q, VarlenLayout.from_lengths([3, 3], "cpu"))
    with pytest.raises(ValueError, match="backend must be"):
        varlen_attention(q, q, q, VarlenLayout.from_lengths([5], "cpu"), backend="xformers")


def test_backends_agree_and_switch() -> None:
    tower = _tower()
    x = random_pixels(tower.config, GRIDS)
    with torch.no_grad():
        a = tower(x, GRIDS)
        tower.set_attn_implementation("eager")
        b = tower(x, GRIDS)
    torch.testing.assert_close(a.merged, b.merged, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="attn_implementation must be"):
        tower.set_attn_implementation("xformers")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
@pytest.mark.gpu
def test_flash_backend_matches_sdpa() -> None:
    tower = _tower().cuda().to(torch.bfloat16)
    x = random_pixels(tower.config, GRIDS, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        a = tower(x, GRIDS)
        tower.set_attn_implementation("flash")
        b = tower(x, GRIDS)
    torch.testing.assert_close(a.merged.float(), b.merged.float(), rtol=0.05, atol=0.05)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_backend_without_flash_attn_is_a_clear_error() -> None:
    with pytest.raises(ImportError, match="needs flash-attn"):
        VisionTransformer(tiny_config(attn_implementation="flash"))


def test_gradient_checkpointing_same_gradients() -> None:
    grads = []
    for ckpt in (False, True):
        tower = _tower(gradient_checkpointing=ckpt).train()
        x = random_pixels(tower.config, GRIDS).requires_grad_()
        out = tower(x, GRIDS)
        loss = out.merged.square().mean() + sum(d.sin().mean() for d in out.deepstack)
        loss.backward()
        assert x.grad is not None
        grads.append([x.grad.clone()] + [p.grad.clone() for p in tower.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_bf16_close_to_fp32() -> None:
    tower = VisionTransformer(tiny_config()).eval()
    randomize(tower, seed=9)
    x = random_pixels(tower.config, GRIDS, dtype=torch.float32)
    with torch.no_grad():
        ref = tower(x, GRIDS)
        low = tower.to(torch.bfloat16)(x.bfloat16(), GRIDS)
    assert low.merged.dtype == torch.bfloat16
    for a, b in zip([ref.merged, *ref.deepstack], [low.merged, *low.deepstack], strict=True):
        err = (a - b.float()).norm() / a.norm()
        assert err < 0.03, float(err)
