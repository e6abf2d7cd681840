"""compose(position_style="mrope"): a Qwen3 LM + our tower computes what transformers' Qwen3-VL does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _compose_helpers import IMAGE, TOKEN_IDS, image_batch, lm_config, qwen3_vl_twin, vision_config
from transformers import AutoModelForImageTextToText

from vl_model.compose import compose, swap_language_model


def _mrope_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return compose(vision_config(), lm_config("qwen3"), position_style="mrope", **TOKEN_IDS).eval()


def _left_padded() -> dict[str, torch.Tensor]:
    batch = image_batch()
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    ids[1] = torch.cat([torch.zeros(2, dtype=ids.dtype), ids[1, :-2]])  # row 1: two pad tokens on the left
    mask[1, :2] = 0
    return {**batch, "input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("padded", [False, True])
def test_logits_equal_transformers_qwen3_vl(padded: bool) -> None:
    model = _mrope_model()
    twin = qwen3_vl_twin(model)
    batch = _left_padded() if padded else image_batch()
    mm = (batch["input_ids"] == IMAGE).long()
    with torch.no_grad():
        ours, ref = model(**batch).logits, twin(**batch, mm_token_type_ids=mm).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], ref[keep], rtol=1e-4, atol=1e-5)


def test_greedy_generate_equals_transformers_qwen3_vl() -> None:
    model = _mrope_model(seed=1)
    twin = qwen3_vl_twin(model)
    batch = _left_padded()
    mm = (batch["input_ids"] == IMAGE).long()
    ours = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    ref = twin.generate(**batch, mm_token_type_ids=mm, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(ours, ref)


def test_mrope_changes_positions_only_with_images() -> None:
    torch.manual_seed(0)
    one_d = compose(vision_config(), lm_config("qwen3"), **TOKEN_IDS).eval()
    mrope = compose(vision_config(), lm_config("qwen3"), position_style="mrope", **TOKEN_IDS).eval()
    mrope.load_state_dict(one_d.state_dict())
    text = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        # Text only: all three axes equal the 1-D position, so MRoPE is plain RoPE.
        torch.testing.assert_close(mrope(input_ids=text).logits, one_d(input_ids=text).logits)
        batch = image_batch()
        assert not torch.allclose(mrope(**batch).logits, one_d(**batch).logits)


def test_mrope_roundtrip_and_swap(tmp_path: Path) -> None:
    model = _mrope_model()
    batch = image_batch()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert loaded.config.position_style == "mrope" and loaded.config.mrope_section == [4, 2, 2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    swap_language_model(model, lm_config("llama"))
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
    with pytest.raises(ValueError, match="summing to head_dim / 2 = 8"):
        compose(vision_config(), lm_config(), position_style="mrope", mrope_section=[2, 2, 2], **TOKEN_IDS)
    scaled = lm_config("llama")
    scaled.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="default rope type only"):
        compose(vision_config(), scaled, position_style="mrope", **TOKEN_IDS)
