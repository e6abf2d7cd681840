"""SigLIP-2 interop: exact-mode parity with transformers' ``Siglip2VisionModel`` and ``from_siglip2``."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from vl_vision.siglip2 import (
    Siglip2EncoderConfig,
    Siglip2VisionEncoder,
    from_siglip2,
    qwen_patches_to_siglip2,
)

D, LAYERS, HEADS, P, C = 32, 2, 2, 4, 3
SHAPES = [(3, 5), (4, 2)]  # two images of different grids; the second is padded in the batch
L = 16


def hf_siglip2(use_head: bool = True, num_patches: int = 16, seed: int = 0) -> Any:
    """A tiny random ``Siglip2VisionModel`` (float64, eval) with every parameter randomised."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Siglip2VisionConfig(
        hidden_size=D,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        patch_size=P,
        num_patches=num_patches,
        vision_use_head=use_head,
    )
    cfg._attn_implementation = "sdpa"
    model = transformers.Siglip2VisionModel(cfg).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            is_norm_weight = ("norm" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_norm_weight else noise * (0.2 if p.dim() > 1 else 0.05))
    return model


def padded_inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded batch ``[2, L, P*P*C]``, its mask and spatial shapes (padding filled with noise)."""
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(len(SHAPES), L, P * P * C, generator=g, dtype=dtype)
    mask = torch.zeros(len(SHAPES), L, dtype=torch.long)
    for i, (h, w) in enumerate(SHAPES):
        mask[i, : h * w] = 1
    return pixels, mask, torch.tensor(SHAPES)


def test_exact_mode_float64_matches_transformers_with_padding() -> None:
    hf = hf_siglip2()
    ours = Siglip2VisionEncoder.from_siglip2(hf)
    pixels, mask, shapes = padded_inputs()
    with torch.no_grad():
        ref = hf(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
        out = ours(pixels, mask, shapes)
        packed = ours.forward_packed(torch.cat([pixels[i, : h * w] for i, (h, w) in enumerate(SHAPES)]), shapes)
    assert out.last_hidden_state.dtype == torch.float64
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=1e-8)  # padded rows too
    assert out.pooler_output is not None
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=1e-8)
    valid = ref.last_hidden_state[mask.bool()]
    torch.testing.assert_close(packed.last_hidden_state, valid, rtol=0, atol=1e-8)
    assert packed.pooler_output is not None
    torch.testing.assert_close(packed.pooler_output, ref.pooler_output, rtol=0, atol=1e-8)


def test_exact_mode_float32_without_head_from_pair() -> None:
    hf = hf_siglip2(use_head=False).float()
    ours = Siglip2VisionEncoder.from_siglip2((hf.state_dict(), hf.config.to_dict()))
    assert ours.head is None and ours.patch_embedding.weight.dtype == torch.float32
    pixels, mask, shapes = padded_inputs(torch.float32)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
        out = ours(pixels, mask, shapes)
    assert out.pooler_output is None
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=3e-5)


def test_loads_from_saved_directory(tmp_path: Path) -> None:
    if importlib.util.find_spec("safetensors") is None:
        pytest.skip("safetensors is not installed: loading a checkpoint directory needs it")
    hf = hf_siglip2()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = Siglip2VisionEncoder.from_siglip2(tmp_path)
    pixels, mask, shapes = padded_inputs()
    with torch.no_grad():
        ref = hf(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
        torch.testing.assert_close(ours(pixels, mask, shapes).last_hidden_state, ref.last_hidden_state)
    tower = from_siglip2(str(tmp_path), out_hidden_size=40, deepstack_visual_indexes=[0], num_position_embeddings=16)
    src = hf.state_dict()
    torch.testing.assert_close(tower.pos_embed.weight, src["embeddings.position_embedding.weight"], rtol=0, atol=0)


def tiny_tower(hf: Any, **overrides: Any) -> tuple[Any, dict[str, list[str]]]:
    kwargs: dict[str, Any] = dict(out_hidden_size=40, deepstack_visual_indexes=[0], num_position_embeddings=36)
    kwargs.update(overrides)
    return from_siglip2(hf, output_loading_info=True, **kwargs)


def test_from_siglip2_maps_every_block_weight() -> None:
    hf = hf_siglip2()
    tower, info = tiny_tower(hf)
    src, ours = hf.state_dict(), tower.state_dict()
    assert tower.config.depth == LAYERS and tower.config.patch_size == P and tower.dtype == torch.float64
    for i in range(LAYERS):
        s, o = f"encoder.layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = torch.cat([src[f"{s}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            assert torch.equal(ours[f"{o}attn.qkv.{kind}"], qkv)
            for a, b in [("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj")]:
                assert torch.equal(ours[f"{o}{a}.{kind}"], src[f"{s}{b}.{kind}"])
            for a, b in [("mlp.linear_fc1", "mlp.fc1"), ("mlp.linear_fc2", "mlp.fc2")]:
                assert torch.equal(ours[f"{o}{a}.{kind}"], src[f"{s}{b}.{kind}"])
    assert info["missing_keys"] and all(
        k.startswith(("merger.", "deepstack_merger_list.")) for k in info["missing_keys"]
    )
    assert {k.split(".")[0] for k in info["unexpected_keys"]} == {"post_layernorm", "head"}


def test_still_image_patch_embedding_equals_siglip() -> None:
    hf = hf_siglip2()
    tower, _ = tiny_tower(hf)
    t = tower.config.temporal_patch_size
    image = torch.randn(C, 2 * P, 4 * P, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # SigLIP's processor: raster patches, (py, px, c) inside a patch
    siglip_rows = rearrange(image, "c (h py) (w px) -> (h w) (py px c)", py=P, px=P)
    # our processor: the still repeated T times, merge-block order, (c, t, py, px) inside a patch
    frames = image[None].expand(t, -1, -1, -1)
    qwen_rows = rearrange(frames, "t c (bh m1 py) (bw m2 px) -> (bh bw m1 m2) (c t py px)", m1=2, m2=2, py=P, px=P)
    with torch.no_grad():
        ref = hf.embeddings.patch_embedding(siglip_rows)
        ours = tower.patch_embed(qwen_rows)
    patches, shapes = qwen_patches_to_siglip2(qwen_rows, torch.tensor([[1, 2, 4]]), patch_size=P, temporal_patch_size=t)
    assert torch.equal(patches, siglip_rows) and shapes.tolist() == [[2, 4]]
    order = rearrange(torch.arange(8).view(2, 4), "(bh m1) (bw m2) -> (bh bw m1 m2)", m1=2, m2=2)
    torch.testing.assert_close(ours, ref[order], rtol=0, atol=1e-12)


def test_position_table_resampled_like_siglip() -> None:
    hf = hf_siglip2()
    table = hf.state_dict()["embeddings.position_embedding.weight"]
    same, _ = tiny_tower(hf, num_position_embeddings=16)
    assert torch.equal(same.pos_embed.weight, table)
    tower, _ = tiny_tower(hf, num_position_embeddings=36)
    grid = table.view(4, 4, D).permute(2, 0, 1)[None]
    ref = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False, antialias=True)
    assert tower.pos_embed.weight.shape == (36, D) and tower.pos_embed.side == math.isqrt(36)
    torch.testing.assert_close(tower.pos_embed.weight, ref[0].reshape(D, 36).t())


def test_bad_inputs_raise_value_errors() -> None:
    hf = hf_siglip2(use_head=False)
    state, config = hf.state_dict(), hf.config.to_dict()
    with pytest.raises(ValueError, match="model_type 'siglip_vision_model'"):
        from_siglip2((state, {**config, "model_type": "siglip_vision_model"}))
    with pytest.raises(ValueError, match="patch_size = 16 contradicts"):
        tiny_tower(hf, patch_size=16)
    with pytest.raises(ValueError, match="patch size mismatch"):
        Siglip2VisionEncoder.from_siglip2((state, {**config, "patch_size": 2}))
    with pytest.raises(ValueError, match="depth = 3 but the SigLIP-2 checkpoint has 2 layers"):
        tiny_tower(hf, depth=3)
    with pytest.raises(ValueError, match="norm = 'rmsnorm' contradicts"):
        tiny_tower(hf, norm="rmsnorm")
    with pytest.raises(ValueError, match="not a SigLIP-2 vision checkpoint"):
        from_siglip2(({"w": torch.zeros(1)}, config))
    with pytest.raises(TypeError, match="source must be"):
        from_siglip2(42)
    enc = Siglip2VisionEncoder(Siglip2EncoderConfig.from_hf(config))
    assert enc.head is None and len(enc.blocks) == LAYERS
    with pytest.raises(ValueError, match="spatial_shapes describe 6 patches"):
        enc.forward_packed(torch.randn(5, P * P * C), torch.tensor([[2, 3]]))


def test_depth_override_truncates_and_reports_unused_layers() -> None:
    tower, info = tiny_tower(hf_siglip2(use_head=False), depth=1)
    assert len(tower.blocks) == 1
    assert any(k.startswith("encoder.layers.1.") for k in info["unexpected_keys"])
