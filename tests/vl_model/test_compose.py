"""compose / swap_language_model / freezing helpers on tiny Qwen3, Qwen2 and Llama LMs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _compose_helpers import (
    FAMILIES,
    IMAGE,
    TOKEN_IDS,
    VOCAB,
    image_batch,
    lm_config,
    tiny_model,
    video_batch,
    vision_config,
)
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from vl_model.compose import (
    ComposedVLConfig,
    ComposedVLForConditionalGeneration,
    compose,
    swap_language_model,
)
from vl_model.parts import freeze, trainable_parameters, unfreeze
from vl_vision import VisionTransformer


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_loss(family: str) -> None:
    model = tiny_model(family)
    batch = image_batch()
    labels = batch["input_ids"].masked_fill(batch["input_ids"] >= IMAGE, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], VOCAB)
    assert torch.isfinite(out.loss)
    assert model.config.text_config.model_type == family
    assert type(model.language_model) is AutoModelForCausalLM._model_mapping[type(model.config.text_config)]


def test_images_and_videos_interleaved() -> None:
    model = tiny_model()
    batch = video_batch()
    out = model(**batch)
    assert out.logits.shape == (1, batch["input_ids"].shape[1], VOCAB)


def _layer0_outputs(model: ComposedVLForConditionalGeneration, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    layer = model.language_model.model.layers[0]
    # Registered after the DeepStack hook, so it sees the injected output.
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen[0]


def test_deepstack_changes_visual_positions_only() -> None:
    model = tiny_model()
    batch = image_batch()
    with_ds = _layer0_outputs(model, batch)
    with torch.no_grad():
        _, deepstack = model.encode_vision(batch["pixel_values"], batch["image_grid_thw"])
        for merger in model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
    without = _layer0_outputs(model, batch)
    visual = batch["input_ids"] == IMAGE
    diff = with_ds - without
    assert diff[~visual].abs().max() == 0
    torch.testing.assert_close(diff[visual], deepstack[0], rtol=1e-5, atol=1e-5)


def test_placeholder_count_mismatch() -> None:
    model = tiny_model()
    batch = image_batch()
    batch["input_ids"][0, 4] = 7  # one image placeholder fewer
    with pytest.raises(ValueError, match=r"9 image placeholder tokens .* 10 image features"):
        model(**batch)
    batch = video_batch()
    batch["input_ids"][0, 2] = 7
    with pytest.raises(ValueError, match=r"7 video placeholder tokens .* 8 video features"):
        model(**batch)


def test_pixels_and_grids_go_together() -> None:
    model = tiny_model()
    batch = image_batch()
    with pytest.raises(ValueError, match="grid_thw given without image pixels"):
        model(input_ids=batch["input_ids"], image_grid_thw=batch["image_grid_thw"])
    with pytest.raises(ValueError, match="pixels given without image grid_thw"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])


def test_inputs_embeds_path_matches_ids() -> None:
    model = tiny_model()
    batch = image_batch()
    ref = model(**batch).logits
    ids = batch.pop("input_ids")
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds, **batch).logits, ref)


@pytest.mark.parametrize("auto", [AutoModelForImageTextToText, AutoModel])
def test_save_load_roundtrip(tmp_path: Path, auto: type) -> None:
    model = tiny_model("qwen3", tie=True)
    batch = image_batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = auto.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ComposedVLForConditionalGeneration)
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, ComposedVLConfig)
    assert config.text_config.model_type == "qwen3" and config.vision_config == model.config.vision_config


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_greedy_generate_matches_manual_loop(family: str) -> None:
    model = tiny_model(family, seed=3)
    batch = {k: v[:1] if k != "pixel_values" else v[:16] for k, v in image_batch().items()}
    batch["image_grid_thw"] = batch["image_grid_thw"][:1]
    new = 6
    out = model.generate(**batch, max_new_tokens=new, do_sample=False, min_new_tokens=new)
    ids = batch["input_ids"]
    with torch.no_grad():
        for _ in range(new):
            logits = model(
                input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]
            ).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape == (1, batch["input_ids"].shape[1] + new)
    assert torch.equal(out, ids)


def test_processor_token_types_are_accepted_and_change_nothing() -> None:
    """A VLProcessor's whole output (with ``mm_token_type_ids``) goes to forward and generate as it is."""
    model = tiny_model(seed=4).eval()
    batch = {k: v for k, v in image_batch().items() if k != "labels"}
    types = (batch["input_ids"] == model.config.image_token_id).long()
    with torch.no_grad():
        plain = model(**batch).logits
        typed = model(**batch, mm_token_type_ids=types).logits
    assert torch.equal(plain, typed)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(**batch, mm_token_type_ids=types, **kwargs), model.generate(**batch, **kwargs))


def test_training_step_merger_only() -> None:
    model = tiny_model().train()
    freeze(model, ("vision", "llm"))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = image_batch()
    labels = batch["input_ids"].masked_fill(batch["input_ids"] >= IMAGE, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("visual.merger.") for k in changed)
    assert any(k.startswith("visual.deepstack_merger_list.") for k in changed)
    assert not any(k.startswith("language_model.") for k in changed)
    assert not any(k.startswith(("visual.blocks.", "visual.patch_embed.", "visual.pos_embed.")) for k in changed)


def test_gradient_checkpointing_keeps_deepstack() -> None:
    model = tiny_model().train()
    batch = image_batch()
    ref = model(**batch).logits
    ref.sum().backward()
    grad = model.visual.deepstack_merger_list[0].linear_fc2.weight.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable()
    out = model(**batch).logits
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.visual.deepstack_merger_list[0].linear_fc2.weight.grad, grad)


def test_swap_language_model_keeps_tower_and_mergers() -> None:
    model = tiny_model("qwen3")
    tower = {k: v.clone() for k, v in model.visual.state_dict().items()}
    visual = model.visual
    torch.manual_seed(5)
    new_lm = AutoModelForCausalLM.from_config(lm_config("llama"))
    swapped = swap_language_model(model, new_lm, image_token_id=240)
    assert swapped is model and model.visual is visual and model.language_model is new_lm
    for k, v in model.visual.state_dict().items():
        assert torch.equal(v, tower[k]), k
    assert model.config.text_config.model_type == "llama" and model.config.image_token_id == 240
    batch = image_batch()
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE, 240)
    assert model(**batch).logits.shape[-1] == VOCAB
    with pytest.raises(ValueError, match="hidden size 48 but the merger outputs width 32"):
        swap_language_model(model, lm_config("qwen2", hidden=48))
    with pytest.raises(ValueError, match="outside the language model's vocabulary"):
        swap_language_model(model, lm_config("qwen2"), video_token_id=VOCAB)


def test_swapped_model_roundtrip(tmp_path: Path) -> None:
    model = swap_language_model(tiny_model("qwen3"), lm_config("qwen2")).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    batch = image_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_merger_width_mismatch() -> None:
    torch.manual_seed(0)
    tower = VisionTransformer(vision_config(out=48))
    with pytest.raises(ValueError, match="outputs width 48 but the language model's hidden size is 32"):
        compose(tower, lm_config(), **TOKEN_IDS)
    blocks = {k: v.clone() for k, v in tower.blocks.state_dict().items()}
    model = compose(tower, lm_config(), new_merger=True, **TOKEN_IDS).eval()
    assert model.visual.merger.linear_fc2.out_features == 32
    assert model.config.vision_config["out_hidden_size"] == 32
    assert all(torch.equal(v, blocks[k]) for k, v in model.visual.blocks.state_dict().items())
    assert model(**image_batch()).logits.shape[-1] == VOCAB


def test_compose_rejects_bad_setups() -> None:
    with pytest.raises(ValueError, match="outside the language model's vocabulary"):
        compose(vision_config(), lm_config(), image_token_id=VOCAB)
    with pytest.raises(ValueError, match="2 DeepStack mergers but the language model has only 1 layers"):
        compose(vision_config(), lm_config(layers=1), **TOKEN_IDS)
    with pytest.raises(ValueError, match="position_style must be one of"):
        compose(vision_config(), lm_config(), position_style="3d", **TOKEN_IDS)
    with pytest.raises(ValueError, match="not a local directory"):
        compose(vision_config(), "no/such-model", **TOKEN_IDS)


def test_from_siglip2_source() -> None:
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    sig = Siglip2VisionModel(
        Siglip2VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=4,
            num_patches=64,
        )
    ).eval()
    model = compose(sig, lm_config(), deepstack_visual_indexes=[0, 1], **TOKEN_IDS).eval()
    state = sig.state_dict()
    prefix = next(k for k in state if k.endswith("encoder.layers.0.layer_norm1.weight"))
    assert torch.equal(model.visual.blocks[0].norm1.weight, state[prefix])
    assert model.visual.config.out_hidden_size == 32
    assert model(**image_batch()).logits.shape[-1] == VOCAB


def _core_model() -> nn.Module:
    """A tiny core ``VLForConditionalGeneration`` (the other layout the part helpers take)."""
    from _core_helpers import hf_config_dict

    from vl_model import VLConfig, VLForConditionalGeneration

    return VLForConditionalGeneration(VLConfig.from_qwen3_vl({**hf_config_dict(), "model_type": "qwen3_vl"}))


@pytest.mark.parametrize("layout", ["composed", "core"])
def test_freeze_helpers(layout: str) -> None:
    model: nn.Module = tiny_model("qwen3", tie=True) if layout == "composed" else _core_model()
    total = trainable_parameters(model)
    assert set(total) == {"vision", "merger", "deepstack", "llm"}
    assert sum(total.values()) == sum(p.numel() for p in model.parameters())
    visual = model.visual if layout == "composed" else model.model.visual  # type: ignore[union-attr]
    assert total["merger"] == sum(p.numel() for p in visual.merger.parameters())
    assert total["deepstack"] == sum(p.numel() for p in visual.deepstack_merger_list.parameters())
    freeze(model, ("vision", "llm"))
    counts = trainable_parameters(model)
    assert counts["vision"] == 0 and counts["llm"] == 0
    assert counts["merger"] == total["merger"] and counts["deepstack"] == total["deepstack"]
    assert not visual.patch_embed.proj.weight.requires_grad and visual.merger.linear_fc1.weight.requires_grad
    freeze(model, "deepstack")
    assert trainable_parameters(model)["deepstack"] == 0
    unfreeze(model)
    assert trainable_parameters(model) == total
    with pytest.raises(ValueError, match="unknown parts"):
        freeze(model, ("tower",))


def test_lora_on_language_model() -> None:
    peft = pytest.importorskip("peft")
    model = tiny_model().train()
    freeze(model, ("vision", "merger", "deepstack", "llm"))
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model.language_model = peft.inject_adapter_in_model(lora, model.language_model)
    counts = trainable_parameters(model)
    assert counts["llm"] > 0 and counts["vision"] == counts["merger"] == 0
    batch = image_batch()
    labels = batch["input_ids"].masked_fill(batch["input_ids"] >= IMAGE, -100)
    model(**batch, labels=labels).loss.backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)


@pytest.mark.parametrize("style", ["mrope"])
def test_torch_compile_cpu(style: str) -> None:
    torch.manual_seed(0)
    model = compose(vision_config(), lm_config(), position_style=style, **TOKEN_IDS).eval()
    batch = image_batch()
    with torch.no_grad():
        ref = model(**batch).logits
        # aot_eager traces forward (DeepStack hooks, MRoPE rotary included) without a C++ toolchain.
        out = torch.compile(model, backend="aot_eager")(**batch).logits
    torch.testing.assert_close(out, ref)


def test_config_from_dicts_builds_the_lm_family() -> None:
    config = ComposedVLConfig(
        vision_config=vision_config().to_dict(), text_config=lm_config("llama").to_dict(), **TOKEN_IDS
    )
    assert type(config.text_config).__name__ == "LlamaConfig"
    model = ComposedVLForConditionalGeneration(config).eval()
    assert type(model.language_model).__name__ == "LlamaForCausalLM"
    assert model(**image_batch()).logits.shape[-1] == VOCAB
    with pytest.raises(ValueError, match="unknown VisionConfig fields"):
        ComposedVLConfig(vision_config={"depth": 2, "bogus": 1}, text_config=lm_config().to_dict())


def test_generation_uses_the_swapped_language_models_tokens() -> None:
    # the reasoning LLM of the adapter-transfer recipe has another tokenizer: its end-of-turn and padding
    # ids differ, and the old ones are other words of its vocabulary
    old_config, new_config = lm_config("qwen3"), lm_config("llama")
    old_config.eos_token_id, old_config.pad_token_id = 10, 11
    new_config.bos_token_id, new_config.eos_token_id, new_config.pad_token_id = 22, 20, 21
    torch.manual_seed(0)
    model = compose(vision_config(), AutoModelForCausalLM.from_config(old_config), **TOKEN_IDS)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (10, 11)
    swap_language_model(model, AutoModelForCausalLM.from_config(new_config))
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (22, 20, 21)
