"""VLConfig / VLTextConfig / VLVisionConfig: defaults, round trips, Qwen3-VL mapping, unknown fields."""

from __future__ import annotations

import pytest
import transformers
from _core_helpers import hf_config_dict

from vl_model.configuration import VLConfig, VLTextConfig, VLVisionConfig


def test_defaults_are_qwen3_vl_like() -> None:
    cfg = VLConfig()
    assert cfg.model_type == "vl"
    assert isinstance(cfg.text_config, VLTextConfig) and isinstance(cfg.vision_config, VLVisionConfig)
    assert cfg.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert cfg.text_config.rope_parameters["mrope_interleaved"] is True
    assert (cfg.image_token_id, cfg.video_token_id) == (151655, 151656)
    assert cfg.text_config.num_experts == 0 and not cfg.text_config.is_moe_layer(0)


def test_dict_round_trip(tmp_path) -> None:
    cfg = VLConfig.from_qwen3_vl(hf_config_dict(moe=True) | {"model_type": "qwen3_vl_moe"})
    cfg.save_pretrained(tmp_path)
    back = VLConfig.from_pretrained(tmp_path)
    assert back.text_config.to_dict() == cfg.text_config.to_dict()
    assert back.vision_config.deepstack_visual_indexes == [0, 1]
    auto = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(auto, VLConfig)


@pytest.mark.parametrize("moe", [False, True])
def test_from_qwen3_vl(moe: bool) -> None:
    cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    hf = cls(**hf_config_dict(moe))
    cfg = VLConfig.from_qwen3_vl(hf)
    text = cfg.text_config
    assert text.hidden_size == 64 and text.head_dim == 16 and text.num_key_value_heads == 2
    assert text.rope_parameters["mrope_section"] == [4, 2, 2]
    if moe:
        assert text.num_experts == 4 and text.num_experts_per_tok == 2 and text.mlp_only_layers == [1]
        assert [text.is_moe_layer(i) for i in range(3)] == [True, False, True]
    else:
        assert text.num_experts == 0
    official = cfg.to_qwen3_vl_dict()
    assert official["model_type"] == ("qwen3_vl_moe" if moe else "qwen3_vl")
    again = cls(**{k: v for k, v in official.items() if k != "model_type"})
    assert again.text_config.hidden_size == 64


def test_sparse_step_and_mlp_only_layers() -> None:
    text = VLTextConfig(num_hidden_layers=4, num_experts=4, decoder_sparse_step=2, mlp_only_layers=[3])
    assert [text.is_moe_layer(i) for i in range(4)] == [False, True, False, False]


def test_unknown_fields_kept_and_typos_named() -> None:
    """Unknown keys are kept as attributes (as transformers keeps them); a near miss of our field warns."""
    with pytest.warns(UserWarning, match="did you mean 'hidden_size'"):
        assert VLTextConfig(hiden_size=8).hiden_size == 8
    with pytest.warns(UserWarning, match="did you mean 'patch_size'"):
        VLVisionConfig(patchsize=8)
    assert VLConfig(foo=1).foo == 1
    assert VLConfig(text_config={"bogus": 1}).text_config.bogus == 1
    with pytest.raises(ValueError, match="qwen3_vl"):
        VLConfig.from_qwen3_vl({"model_type": "llama"})


def test_generic_keys_accepted() -> None:
    cfg = VLConfig(torch_dtype="float32", output_attentions=False, architectures=["X"], use_cache=True)
    assert cfg.model_type == "vl"


def test_bad_mrope_section() -> None:
    """Chunked sections must cover the rotary frequencies; interleaved ones are read as transformers reads them."""
    with pytest.raises(ValueError, match="mrope_section"):
        VLTextConfig(
            head_dim=16, rope_parameters={"rope_theta": 1e4, "mrope_section": [24, 20, 20], "mrope_interleaved": False}
        )
    with pytest.raises(ValueError, match="three non-negative"):
        VLTextConfig(head_dim=16, rope_parameters={"rope_theta": 1e4, "mrope_section": [4, 4]})
    VLTextConfig(head_dim=16, rope_parameters={"rope_theta": 1e4, "mrope_section": [24, 20, 20]})


# config.json of an official Qwen3-VL-2B-style release (legacy rope_scaling / rope_theta keys)
_LEGACY = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "tie_word_embeddings": True,
    "transformers_version": "4.57.0.dev0",
    "video_token_id": 151656,
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
    "text_config": {
        "attention_bias": False,
        "bos_token_id": 151643,
        "dtype": "bfloat16",
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": 151936,
    },
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17],
        "depth": 24,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "model_type": "qwen3_vl",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 2048,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


def test_legacy_release_config() -> None:
    cfg = VLConfig.from_qwen3_vl(_LEGACY)
    rope = cfg.text_config.rope_parameters
    assert rope["rope_theta"] == 5000000 and rope["mrope_section"] == [24, 20, 20]
    assert cfg.tie_word_embeddings and cfg.text_config.tie_word_embeddings
    vision = cfg.vision_config.to_vision_config()
    assert vision.depth == 24 and vision.deepstack_visual_indexes == [5, 11, 17]
