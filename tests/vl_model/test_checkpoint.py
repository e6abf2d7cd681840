"""Checkpoints: official Qwen3-VL(-MoE) folders (both expert layouts), our save/load (sharded), Auto classes,
an offline Hugging Face cache, export back to the official layout, pickles (missing / unused keys and broken
files: test_transformers_loading.py)."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
import transformers
from _core_helpers import batch, hf_model, masked, rel_err, saved_hf
from safetensors.torch import load_file, save_file

from vl_model import VLForConditionalGeneration, VLModel, export_qwen3_vl


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def official(request, tmp_path_factory):
    ref, folder = saved_hf(tmp_path_factory.mktemp("official"), request.param)
    with torch.no_grad():
        expected = ref(**batch()).logits
    return ref, folder, expected


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    mask = batch()["attention_mask"]
    return rel_err(masked(a, mask), masked(b, mask)) < 1e-4


def test_hub_layout_experts_are_transposed_on_load(official, tmp_path) -> None:
    _, folder, expected = official
    hub = tmp_path / "hub"
    shutil.copytree(folder, hub)
    state = load_file(str(hub / "model.safetensors"))
    experts = [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    for key in experts:
        state[key] = state[key].transpose(1, 2).contiguous()
    save_file(state, str(hub / "model.safetensors"), metadata={"format": "pt"})
    assert _close(_logits(VLForConditionalGeneration.from_pretrained(hub)), expected)


def test_own_round_trip_sharded_and_auto(official, tmp_path) -> None:
    _, folder, expected = official
    ours = VLForConditionalGeneration.from_pretrained(folder)
    ours.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "vl"
    back = VLForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(_logits(back), _logits(ours))
    auto = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(auto, VLForConditionalGeneration)
    assert _close(_logits(auto), expected)
    base = transformers.AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, VLModel)


@pytest.mark.parametrize("fmt", ["ours", "official"])
def test_offline_hf_cache(official, tmp_path, monkeypatch, fmt: str) -> None:
    _, folder, expected = official
    source = folder
    if fmt == "ours":
        source = tmp_path / "ours"
        VLForConditionalGeneration.from_pretrained(folder).save_pretrained(source)
    cache = tmp_path / "cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-vl"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = VLForConditionalGeneration.from_pretrained("tiny-org/tiny-vl", cache_dir=str(cache))
    assert _close(_logits(model), expected)
    if fmt == "ours":
        auto = transformers.AutoModelForImageTextToText.from_pretrained("tiny-org/tiny-vl", cache_dir=str(cache))
        assert _close(_logits(auto), expected)


def test_export_round_trip(official, tmp_path) -> None:
    ref, folder, expected = official
    ours = VLForConditionalGeneration.from_pretrained(folder)
    export_qwen3_vl(ours, tmp_path, max_shard_size="200KB")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == ref.config.model_type
    cls = type(ref)
    back = cls.from_pretrained(tmp_path).eval()
    assert _close(_logits(back), expected)
    assert _close(_logits(VLForConditionalGeneration.from_pretrained(tmp_path)), expected)


@pytest.mark.parametrize("fmt", ["ours", "official"])
def test_pickle_refused_unless_allowed(official, tmp_path, fmt: str) -> None:
    _, folder, expected = official
    ours = VLForConditionalGeneration.from_pretrained(folder)
    if fmt == "ours":
        ours.config.save_pretrained(tmp_path)
    else:
        shutil.copy(folder / "config.json", tmp_path / "config.json")
    torch.save(ours.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        VLForConditionalGeneration.from_pretrained(tmp_path)
    loaded = VLForConditionalGeneration.from_pretrained(tmp_path, allow_pickle=True)
    assert _close(_logits(loaded), expected)


def test_tied_embeddings_official_and_export(tmp_path) -> None:
    ref = hf_model(tie=True)
    ref.save_pretrained(tmp_path / "hf")
    ours = VLForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert ours.lm_head.weight.data_ptr() == ours.model.language_model.embed_tokens.weight.data_ptr()
    expected = _logits(ref)
    assert _close(_logits(ours), expected)
    export_qwen3_vl(ours, tmp_path / "export")
    back = type(ref).from_pretrained(tmp_path / "export").eval()
    assert _close(_logits(back), expected)
