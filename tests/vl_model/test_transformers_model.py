"""Model structure a transformers user relies on, checked against transformers' Qwen3-VL(-MoE).

Decoder layers are ``GradientCheckpointingLayer``s assembled from their parts (and checkpointing through
transformers' switch gives the same gradients); the vision tower carries the capability flags
transformers reads off a sub-model; the ``mrope_section`` of transformers' own Qwen3-VL tests (larger
than a small head dim allows) gives the same logits; a token id beyond the vocabulary is a clear error.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from _core_helpers import batch, hf_config_dict, hf_model, masked, rel_err, saved_hf
from transformers.modeling_layers import GradientCheckpointingLayer

from vl_model import VLConfig, VLForConditionalGeneration
from vl_moe import SparseMoeBlock


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def pair(request, tmp_path_factory):
    transformers.logging.set_verbosity_error()
    ref, folder = saved_hf(tmp_path_factory.mktemp("model"), request.param)
    return ref, VLForConditionalGeneration.from_pretrained(folder)


def test_decoder_layers_are_built_from_parts(pair) -> None:
    from vl_model._decoder import RMSNorm, VLTextAttention, VLTextDecoderLayer, VLTextMLP

    ref, ours = pair
    text = ours.config.text_config
    for i, layer in enumerate(ours.model.language_model.layers):
        assert isinstance(layer, VLTextDecoderLayer) and isinstance(layer, GradientCheckpointingLayer)
        assert isinstance(layer.self_attn, VLTextAttention)
        assert isinstance(layer.mlp, SparseMoeBlock if text.is_moe_layer(i) else VLTextMLP)
        assert isinstance(layer.input_layernorm, RMSNorm) and isinstance(layer.post_attention_layernorm, RMSNorm)
    assert set(ours.state_dict()) == set(ref.state_dict())  # keys unchanged by the builder


def test_a_layer_takes_any_parts() -> None:
    """The layer is pure composition: swapping the MLP for another module changes only that part."""
    from vl_model._decoder import VLTextDecoderLayer, build_decoder_layer

    text = VLConfig.from_qwen3_vl(hf_config_dict() | {"model_type": "qwen3_vl"}).text_config
    torch.manual_seed(0)
    built = build_decoder_layer(text, 0)
    custom = VLTextDecoderLayer(built.self_attn, torch.nn.Identity(), built.input_layernorm, torch.nn.Identity())
    x = torch.randn(1, 5, text.hidden_size)
    cos_sin = (torch.ones(1, 5, 16), torch.zeros(1, 5, 16))
    attn_only, router, probs = custom(x, cos_sin, None)
    attn, _ = built.self_attn(built.input_layernorm(x), cos_sin, None)
    assert router is None and probs is None
    torch.testing.assert_close(attn_only, 2 * (x + attn))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_through_transformers_switch(pair, reentrant: bool) -> None:
    _, ours = pair
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def grads() -> dict[str, torch.Tensor]:
        ours.zero_grad()
        ours(**inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    ours.train()
    try:
        plain = grads()
        ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert all(layer.gradient_checkpointing for layer in ours.model.language_model.layers)
        calls = []
        hook = ours.model.language_model.layers[0].register_forward_hook(lambda *a: calls.append(1))
        checkpointed = grads()
        hook.remove()
    finally:
        ours.gradient_checkpointing_disable()
        ours.zero_grad()
        ours.eval()
    assert len(calls) == 1  # hooks stay outside the recomputation (transformers checkpoints forward only)
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_vision_tower_capability_flags(pair, tmp_path, impl: str) -> None:
    """What transformers' composite-model tests read off ``model.visual``: flags and the implementation in use."""
    ref, ours = pair
    ours.save_pretrained(tmp_path)
    loaded = VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=impl)
    tower, their_tower = loaded.model.visual, ref.model.visual
    for flag in ("_supports_sdpa", "_supports_flash_attn", "supports_gradient_checkpointing", "input_modalities"):
        assert getattr(tower, flag) == getattr(their_tower, flag), flag
    for flag in ("_supports_flex_attn", "_supports_attention_backend", "_can_compile_fullgraph", "_no_split_modules"):
        assert hasattr(tower, flag), flag  # present; False where our tower lacks the capability
    assert tower.config._attn_implementation == impl == loaded.config.vision_config._attn_implementation
    assert tower.dtype == their_tower.dtype and tower.device == their_tower.device
    assert loaded.model.language_model.config._attn_implementation == impl
    loaded.set_attn_implementation("eager" if impl == "sdpa" else "sdpa")
    assert tower.config._attn_implementation != impl and tower.config.attn_implementation != impl


def test_attention_implementation_per_sub_config(pair, tmp_path) -> None:
    """``attn_implementation={"text_config": ..., "vision_config": ...}`` sets each part, as in transformers."""
    ref, ours = pair
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    choice = {"text_config": "eager", "vision_config": "sdpa"}
    loaded = VLForConditionalGeneration.from_pretrained(tmp_path / "ours", attn_implementation=choice)
    theirs = type(ref).from_pretrained(tmp_path / "ref", attn_implementation=choice)
    for model in (loaded, theirs):
        assert model.config.text_config._attn_implementation == "eager"
        assert model.config.vision_config._attn_implementation == "sdpa"
    assert loaded.model.visual.config.attn_implementation == "sdpa"
    loaded.set_attn_implementation({"text_config": "sdpa", "vision_config": "eager"})
    assert loaded.config.text_config._attn_implementation == "sdpa"
    assert loaded.model.visual.config.attn_implementation == "eager"
    inputs = batch()
    with torch.no_grad():
        got, expected = loaded(**inputs).logits, theirs(**inputs).logits
    mask = inputs["attention_mask"]
    assert rel_err(masked(got, mask), masked(expected, mask)) < 1e-4


def test_mrope_section_of_transformers_tests_for_a_small_head_dim(tmp_path) -> None:
    """transformers' Qwen3-VL test config uses mrope_section [16, 8, 8] with head_dim 8 (4 frequencies)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 8, 8], "mrope_interleaved": True}
    ref = hf_model(False, head_dim=8, rope_parameters=rope)
    ref.save_pretrained(tmp_path)
    ours = VLForConditionalGeneration.from_pretrained(tmp_path)
    assert ours.config.text_config.rope_parameters["mrope_section"] == [16, 8, 8]
    assert ours.model.language_model.rotary_emb.mrope_section == [2, 1, 1]
    inputs = batch()
    with torch.no_grad():
        expected, got = ref(**inputs).logits, ours(**inputs).logits
    mask = inputs["attention_mask"]
    assert rel_err(masked(got, mask), masked(expected, mask)) < 1e-4


def test_rotary_sections_match_transformers_layout() -> None:
    from vl_model._decoder import rotary_sections
    from vl_rope import mrope_axis_of_frequency

    for section, freqs in (([16, 8, 8], 4), ([24, 20, 20], 64), ([2, 1, 1], 8), ([4, 2, 2], 8), ([0, 5, 0], 6)):
        theirs = torch.zeros(freqs, dtype=torch.long)  # transformers' rule, spelled out
        for axis, offset in ((1, 1), (2, 2)):
            theirs[offset : section[axis] * 3 : 3] = axis
        ours = mrope_axis_of_frequency(rotary_sections(section, freqs, True), True)
        assert torch.equal(ours, theirs), section


def test_token_id_beyond_the_vocabulary(pair) -> None:
    _, ours = pair
    vocab = ours.config.text_config.vocab_size
    ids = torch.randint(1, 240, (2, 9))
    ids[1, 4] = vocab + 5
    with pytest.raises(ValueError, match=rf"token id {vocab + 5} at row 1, position 4.*vocabulary of {vocab}"):
        ours(input_ids=ids)
    with pytest.raises(ValueError, match=rf"token id -3 .*{vocab}"):
        ours.model.language_model(input_ids=torch.tensor([[1, -3]]))
    ours.train()
    try:  # CPU ids are checked while training too (no host sync to avoid)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            ours(input_ids=ids)
    finally:
        ours.eval()
