"""Bad input gives clear errors: token/feature count mismatches, half-given visual inputs, over-long rows."""

from __future__ import annotations

import pytest
import torch
from _core_helpers import IMAGE, VIDEO, batch, hf_config_dict

from vl_model import VLConfig, VLForConditionalGeneration


def _model(**text_overrides) -> VLForConditionalGeneration:
    torch.manual_seed(0)
    cfg = VLConfig.from_qwen3_vl(hf_config_dict(False, **text_overrides) | {"model_type": "qwen3_vl"})
    return VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def model() -> VLForConditionalGeneration:
    return _model()


def test_image_token_count_mismatch_names_both_numbers(model) -> None:
    inputs = batch(videos=False)
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == IMAGE).nonzero()[0])
    ids[0, first] = 7  # one placeholder fewer: 9 tokens for 10 features
    inputs.update(input_ids=ids)
    inputs.pop("mm_token_type_ids")
    with pytest.raises(ValueError, match=r"9 image placeholder tokens.*10 features"):
        model(**inputs)


def test_video_token_count_mismatch_names_both_numbers(model) -> None:
    inputs = batch(images=False)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"][:16]
    inputs["video_grid_thw"] = torch.tensor([[1, 4, 4]])
    inputs.pop("mm_token_type_ids")
    n_tokens = int((inputs["input_ids"] == VIDEO).sum())
    with pytest.raises(ValueError, match=rf"{n_tokens} video placeholder tokens.*4 features"):
        model(**inputs)


@pytest.mark.parametrize(
    ("drop", "match"),
    [
        ("image_grid_thw", "pixel_values was given without image_grid_thw"),
        ("pixel_values", "image_grid_thw was given without pixel_values"),
        ("video_grid_thw", "pixel_values_videos was given without video_grid_thw"),
        ("pixel_values_videos", "video_grid_thw was given without pixel_values_videos"),
    ],
)
def test_half_given_visual_inputs(model, drop: str, match: str) -> None:
    inputs = batch()
    inputs.pop(drop)
    with pytest.raises(ValueError, match=match):
        model(**inputs)


def test_patch_count_differs_from_grid(model) -> None:
    inputs = batch(videos=False)
    inputs["pixel_values"] = inputs["pixel_values"][:-4]
    with pytest.raises(ValueError, match=r"36 patches but image_grid_thw describes 40"):
        model(**inputs)


def test_beyond_context_without_scaling(model) -> None:
    ids = torch.randint(1, 240, (1, 520))
    with pytest.raises(ValueError, match=r"position 519 is beyond the configured context of 512"):
        model(input_ids=ids)


def test_beyond_context_with_yarn_is_fine() -> None:
    rope = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "mrope_section": [4, 2, 2],
        "factor": 2.0,
        "original_max_position_embeddings": 512,
    }
    model = _model(rope_parameters=rope)
    with torch.no_grad():
        out = model(input_ids=torch.randint(1, 240, (1, 520)), logits_to_keep=1)
    assert out.logits.shape == (1, 1, 300)


def test_input_ids_and_embeds_exclusive(model) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), inputs_embeds=torch.zeros(1, 3, 64))


def test_nan_pixels_and_an_empty_text_batch_are_named() -> None:
    from _tok import make_tokenizer

    from vl_model import VLProcessor

    model = VLForConditionalGeneration(VLConfig.from_qwen3_vl({**hf_config_dict(), "model_type": "qwen3_vl"})).eval()
    inputs = batch(videos=False)
    inputs["pixel_values"][5, 3] = float("nan")
    with pytest.raises(ValueError, match=r"pixel_values hold NaN or inf \(first at patch row 5 of"):
        model(**inputs)
    with torch.no_grad():
        inputs["pixel_values"][5, 3] = 0.0
        assert torch.isfinite(model(**inputs).logits).all()
    with pytest.raises(ValueError, match=r"text=\[\]: an empty batch"):
        VLProcessor(tokenizer=make_tokenizer())(text=[])
