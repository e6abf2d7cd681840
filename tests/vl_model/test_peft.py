"""PEFT LoRA on ``VLForConditionalGeneration``: on the LLM, on the vision tower, and on both."""

from __future__ import annotations

import pytest
import torch
from _core_helpers import batch, hf_config_dict

from vl_model import VLConfig, VLForConditionalGeneration

peft = pytest.importorskip("peft")

TARGETS = {
    "llm": ["q_proj", "v_proj"],
    "tower": ["attn.qkv"],
    "both": ["q_proj", "v_proj", "attn.qkv"],
}


@pytest.mark.parametrize("where", list(TARGETS))
def test_lora_trains_only_adapters_and_starts_at_the_base_model(where: str) -> None:
    torch.manual_seed(0)
    base = VLForConditionalGeneration(VLConfig.from_qwen3_vl(hf_config_dict() | {"model_type": "qwen3_vl"}))
    inputs = batch()
    with torch.no_grad():
        want = base.eval()(**inputs).logits
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[where]))
    with torch.no_grad():  # LoRA's B starts at zero: the adapted model equals the base model
        torch.testing.assert_close(model(**inputs).logits, want)
    model.train()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model(**inputs, labels=labels).loss.backward()
    grads = [name for name, p in model.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in name for name in grads)
    in_tower = any(".visual." in name for name in grads)
    in_llm = any(".language_model." in name for name in grads)
    assert (in_tower, in_llm) == {"llm": (False, True), "tower": (True, False), "both": (True, True)}[where]
