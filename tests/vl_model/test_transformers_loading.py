"""Configs and checkpoints load as transformers loads them, with transformers' Qwen3-VL(-MoE) as the oracle.

Unknown ``config.json`` keys are kept (a near miss of one of our fields warns, naming it); weights a
checkpoint lacks are initialised and reported (a base-model checkpoint into the head class); unused
ones are reported; shapes that differ are an error; ``from_pretrained(None, config=..., state_dict=...)``
takes either key layout; a malformed index or a truncated shard is an error naming the file.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from _core_helpers import batch, hf_config_dict, masked, rel_err, saved_hf
from safetensors.torch import load_file, save_file

from vl_model import VLConfig, VLForConditionalGeneration, VLModel, VLTextConfig

EXTRA_KEYS = {
    "quantization_config": {"quant_method": "custom", "bits": 4},
    "my_project_note": "kept as is",
    "output_scores": False,
    "chunk_size_feed_forward": 0,
    "tf_legacy_loss": False,
}


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def official(request, tmp_path_factory):
    transformers.logging.set_verbosity_error()
    ref, folder = saved_hf(tmp_path_factory.mktemp("load"), request.param)
    with torch.no_grad():
        expected = ref(**batch()).logits
    return ref, folder, expected


def _close(model, expected: torch.Tensor) -> bool:
    with torch.no_grad():
        got = model(**batch()).logits
    mask = batch()["attention_mask"]
    return rel_err(masked(got, mask), masked(expected, mask)) < 1e-4


def _add_keys(config_file: Path, keys: dict) -> None:
    data = json.loads(config_file.read_text())
    data.update(keys)
    data["text_config"]["my_text_attribute"] = 3
    config_file.write_text(json.dumps(data))


@pytest.mark.parametrize("fmt", ["official", "ours"])
def test_config_json_with_unknown_keys_loads(official, tmp_path, fmt: str) -> None:
    ref, folder, expected = official
    if fmt == "ours":
        VLForConditionalGeneration.from_pretrained(folder).save_pretrained(tmp_path)
    else:
        shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    _add_keys(tmp_path / "config.json", {k: v for k, v in EXTRA_KEYS.items() if k != "quantization_config"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these keys looks like a typo of ours
        model = VLForConditionalGeneration.from_pretrained(tmp_path)
    assert _close(model, expected)
    assert model.config.my_project_note == "kept as is"
    assert model.config.text_config.my_text_attribute == 3
    if fmt == "official":
        theirs = type(ref).from_pretrained(tmp_path)
        assert theirs.config.my_project_note == model.config.my_project_note


def test_quantization_config_and_user_attributes_in_configs(tmp_path) -> None:
    data = hf_config_dict(moe=True) | {"model_type": "qwen3_vl_moe"} | EXTRA_KEYS
    theirs = transformers.Qwen3VLMoeConfig(**{k: v for k, v in data.items() if k != "model_type"})
    ours = VLConfig.from_qwen3_vl(data)
    assert ours.quantization_config == theirs.quantization_config == EXTRA_KEYS["quantization_config"]
    ours.save_pretrained(tmp_path)
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, VLConfig) and back.my_project_note == "kept as is"
    assert back.quantization_config == EXTRA_KEYS["quantization_config"]


def test_typo_of_our_own_field_warns_with_the_near_match() -> None:
    with pytest.warns(UserWarning, match=r"'hiden_size'.*did you mean 'hidden_size'"):
        cfg = VLTextConfig(hiden_size=8)
    assert cfg.hidden_size == 4096  # the typo does not build another model silently: it was named above
    with pytest.warns(UserWarning, match=r"did you mean 'num_hidden_layers'"):
        VLConfig(text_config={"num_hiden_layers": 2})


def test_base_model_checkpoint_into_the_head_class(official, tmp_path) -> None:
    """Official base-model checkpoint (Qwen3VLModel) and ours (VLModel): lm_head is initialised and reported."""
    ref, _, _ = official
    base_ref = ref.model
    base_ref.save_pretrained(tmp_path / "official_base")
    _, their_info = type(ref).from_pretrained(tmp_path / "official_base", output_loading_info=True)
    ours, info = VLForConditionalGeneration.from_pretrained(tmp_path / "official_base", output_loading_info=True)
    assert set(info["missing_keys"]) == set(their_info["missing_keys"]) == {"lm_head.weight"}
    assert not info["unexpected_keys"]
    assert torch.equal(ours.model.language_model.embed_tokens.weight, base_ref.language_model.embed_tokens.weight)
    inputs = batch()
    with torch.no_grad():
        got = ours.model(**inputs).last_hidden_state
        want = base_ref(**inputs).last_hidden_state
    assert rel_err(masked(got, inputs["attention_mask"]), masked(want, inputs["attention_mask"])) < 1e-4

    assert isinstance(ours.model, VLModel)
    ours.model.save_pretrained(tmp_path / "ours_base")  # our format, base-model keys
    again, info = VLForConditionalGeneration.from_pretrained(tmp_path / "ours_base", output_loading_info=True)
    assert set(info["missing_keys"]) == {"lm_head.weight"}
    assert torch.isfinite(again.lm_head.weight).all()
    assert torch.equal(again.model.language_model.norm.weight, ours.model.language_model.norm.weight)


@pytest.mark.parametrize("fmt", ["ours", "official"])
def test_missing_and_unused_keys_are_reported_not_fatal(official, tmp_path, fmt: str) -> None:
    ref, folder, _ = official
    if fmt == "ours":
        VLForConditionalGeneration.from_pretrained(folder).save_pretrained(tmp_path)
    else:
        shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    dropped = "model.language_model.layers.0.self_attn.q_proj.weight"
    state.pop(dropped)
    state["model.language_model.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, info = VLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert dropped in info["missing_keys"] and "model.language_model.extra.weight" in info["unexpected_keys"]
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.abs().sum() > 0  # initialised
    if fmt == "official":
        _, their_info = type(ref).from_pretrained(tmp_path, output_loading_info=True)
        assert set(info["missing_keys"]) == set(their_info["missing_keys"])
        assert set(info["unexpected_keys"]) == set(their_info["unexpected_keys"])


@pytest.mark.parametrize("fmt", ["ours", "official"])
def test_shape_mismatch_is_an_error(official, tmp_path, fmt: str) -> None:
    ref, folder, _ = official
    if fmt == "ours":
        VLForConditionalGeneration.from_pretrained(folder).save_pretrained(tmp_path)
    else:
        shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "model.language_model.norm.weight"
    state[key] = torch.ones(7)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"mismatch|size"):
        type(ref).from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"mismatch|size"):
        VLForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize("layout", ["memory", "hub"])
def test_from_pretrained_none_with_config_and_state_dict(official, layout: str) -> None:
    ref, _, expected = official
    state = dict(ref.state_dict())
    if layout == "hub":  # Hub files store the MoE expert tensors transposed
        state = {
            k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v
            for k, v in state.items()
        }
    config = VLConfig.from_qwen3_vl(ref.config)
    model = VLForConditionalGeneration.from_pretrained(None, config=config, state_dict=state)
    assert not model.training and _close(model, expected)
    theirs = type(ref).from_pretrained(None, config=ref.config, state_dict=dict(ref.state_dict()))
    assert _close(theirs, expected)
    with pytest.raises(ValueError, match="needs config"):
        VLForConditionalGeneration.from_pretrained(None, state_dict=state)


def _sharded(official, tmp_path: Path, fmt: str) -> Path:
    ref, folder, _ = official
    out = tmp_path / fmt
    if fmt == "ours":
        VLForConditionalGeneration.from_pretrained(folder).save_pretrained(out, max_shard_size="100KB")
    else:
        ref.save_pretrained(out, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.mark.parametrize("fmt", ["ours", "official"])
def test_truncated_shard_is_named(official, tmp_path, fmt: str) -> None:
    folder = _sharded(official, tmp_path, fmt)
    shard = sorted(folder.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{shard.name}.*truncated"):
        VLForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize("content", ["{}", "not json", '{"weight_map": {}}'])
@pytest.mark.parametrize("fmt", ["ours", "official"])
def test_malformed_index_is_named(official, tmp_path, fmt: str, content: str) -> None:
    folder = _sharded(official, tmp_path, fmt)
    (folder / "model.safetensors.index.json").write_text(content)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json"):
        VLForConditionalGeneration.from_pretrained(folder)


def test_index_naming_a_missing_shard(official, tmp_path) -> None:
    folder = _sharded(official, tmp_path, "official")
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        VLForConditionalGeneration.from_pretrained(folder)
