"""LLaVA-style samples are converted (media where the markers were); a marker left in our format's text is an
error naming the message, never trained as text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _data_helpers import make_processor, supervised_text
from PIL import Image

from vl_train.data.format import DataError, DataStats, JsonlDataset, validate_sample
from vl_train.data.llava import from_llava
from vl_train.data.render import SampleRenderer


def test_conversion_puts_the_media_where_the_markers_were() -> None:
    sample = {
        "id": "l1",
        "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "<image>\nand <image>\nwhich is bigger?"},
            {"from": "gpt", "value": "the first"},
        ],
    }
    out = from_llava(sample)
    assert out["messages"] == [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.png"},
                {"type": "text", "text": "and "},
                {"type": "image", "image": "b.png"},
                {"type": "text", "text": "which is bigger?"},
            ],
        },
        {"role": "assistant", "content": "the first"},
    ]
    assert "image" not in out and validate_sample(out) is out
    video = from_llava(
        {
            "id": "v",
            "video": ["f0.png", "f1.png"],
            "conversations": [{"from": "human", "value": "<video>what"}, {"from": "gpt", "value": "x"}],
        }
    )
    assert video["messages"][0]["content"][0] == {"type": "video", "video": ["f0.png", "f1.png"]}


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        (
            {
                "id": "x",
                "image": "a.png",
                "conversations": [{"from": "human", "value": "what"}, {"from": "gpt", "value": "y"}],
            },
            r"gives \{'image': 1\} more media",
        ),
        (
            {"id": "x", "conversations": [{"from": "human", "value": "<image> what"}, {"from": "gpt", "value": "y"}]},
            "more <image> markers than the 0",
        ),
        ({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}, "role 'robot'"),
    ],
)
def test_conversion_errors_name_the_problem(sample: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_llava(sample)


def test_a_marker_in_our_format_is_rejected_by_name() -> None:
    sample = {
        "id": "m",
        "messages": [{"role": "user", "content": "<image>\nwhat is it"}, {"role": "assistant", "content": "a cat"}],
    }
    with pytest.raises(
        DataError, match=r"sample 'm': message 0 text holds the LLaVA marker '<image>', which would be trained as text"
    ):
        validate_sample(sample)


def test_jsonl_of_llava_samples_trains_with_the_images(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    lines = [
        {
            "id": "ok",
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image>\nwhat colour"}, {"from": "gpt", "value": "red"}],
        },
        {
            "id": "bad",
            "image": "red.png",
            "conversations": [{"from": "human", "value": "what colour"}, {"from": "gpt", "value": "red"}],
        },
        {
            "id": "marker",
            "messages": [{"role": "user", "content": "<image> what"}, {"role": "assistant", "content": "red"}],
        },
    ]
    path = tmp_path / "llava.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    stats = DataStats()
    samples = list(JsonlDataset(path, policy="skip", stats=stats))
    assert [s["id"] for s in samples] == ["ok"] and stats["skipped_bad_line"] == 1 and stats["skipped_invalid"] == 1
    assert samples[0]["messages"][0]["content"][0]["image"] == str(tmp_path / "red.png")  # resolved like ours
    processor = make_processor()
    out = SampleRenderer(processor)(samples[0])
    assert out is not None and int(out.image_grid_thw.shape[0]) == 1
    assert supervised_text(processor.tokenizer, out.input_ids, out.labels).startswith("red")
    assert "<image>" not in processor.tokenizer.decode(out.input_ids)
    with pytest.raises(
        DataError, match=r"llava\.jsonl:2: LLaVA-style sample: the sample gives \{'image': 1\} more media"
    ):
        list(JsonlDataset(path))
