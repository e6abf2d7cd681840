"""``import vl_model`` wires everything into transformers' Auto classes: config, model and processor."""

from __future__ import annotations

from pathlib import Path

import torch
from _core_helpers import hf_config_dict
from _tok import make_tokenizer
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import vl_model
from vl_model import VLConfig, VLForConditionalGeneration, VLProcessor


def test_model_and_processor_round_trip_through_auto_classes(tmp_path: Path) -> None:
    config = VLConfig.from_qwen3_vl(hf_config_dict() | {"model_type": "qwen3_vl"})
    torch.manual_seed(0)
    model = VLForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    VLProcessor(tokenizer=make_tokenizer()).save_pretrained(tmp_path)

    assert type(AutoConfig.from_pretrained(tmp_path)) is VLConfig
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor) is VLProcessor
    back = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(back) is VLForConditionalGeneration
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)


def test_public_names() -> None:
    for name in vl_model.__all__:
        assert getattr(vl_model, name) is not None, name
    assert AutoConfig.for_model("vl_composed").model_type == "vl_composed"
