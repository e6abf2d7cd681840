"""VLProcessor's prompt encoding for generation: render_prompt, encode_prompt, pad_prompts (and split_media).

The references are independent: the chat template applied by transformers' own ``apply_chat_template``
path of the tokenizer (text), the processor's plain ``__call__`` on that text (ids and pixels), and the
tokenizer's own left padding (a padded batch).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tok import make_tokenizer

from vl_model.processing import VLProcessor, split_media
from vl_vision.processing import ImageProcessor, VideoProcessor


def _processor() -> VLProcessor:
    budget = {"min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 16}
    return VLProcessor(
        ImageProcessor(**budget, num_threads=1),
        VideoProcessor(**budget, fps=2.0, min_frames=2, max_frames=8, num_threads=1),
        make_tokenizer(),
    )


def _image(seed: int, h: int = 64, w: int = 96) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _messages(seed: int = 0, video: bool = False) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [
        {"type": "image", "image": _image(seed)},
        {"type": "text", "text": "what is in the image"},
    ]
    if video:
        frames = np.random.default_rng(seed).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
        content.append({"type": "video", "video": frames, "fps": 2.0})
    return [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": content}]


@pytest.mark.parametrize("thinking", [None, True, False])
def test_render_prompt_is_the_template_with_the_generation_prompt(thinking: bool | None) -> None:
    processor = _processor()
    messages = _messages(video=True)
    text, images, videos, rates = processor.render_prompt(messages, thinking=thinking)
    template_messages, _, _, _ = split_media(messages)
    kwargs = {"enable_thinking": False} if thinking is False else {}
    want = processor.tokenizer.apply_chat_template(
        template_messages, chat_template=processor.chat_template, add_generation_prompt=True, tokenize=False, **kwargs
    )
    assert text == want
    assert text.endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n" if thinking is False else "<|im_start|>assistant\n"
    )
    assert images == [messages[1]["content"][0]["image"]] and len(videos) == 1 and rates == [2.0]


def test_encode_prompt_equals_the_processor_call_on_the_rendered_text() -> None:
    processor = _processor()
    messages = _messages(video=True)
    got = processor.encode_prompt(messages, thinking=False)
    text, images, videos, rates = processor.render_prompt(messages, thinking=False)
    want = processor(text=[text], images=images, videos=videos, video_fps=rates, add_special_tokens=False)
    assert got["input_ids"].shape[0] == 1
    for key in (
        "input_ids",
        "mm_token_type_ids",
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
    ):
        assert torch.equal(got[key], torch.as_tensor(want[key])), key


def test_pad_prompts_left_pads_like_the_tokenizer_and_keeps_the_pixel_order() -> None:
    processor = _processor()
    short = processor.encode_prompt([{"role": "user", "content": "hi"}])
    long_a = processor.encode_prompt(_messages(seed=1))
    long_b = processor.encode_prompt(_messages(seed=2))
    batch = processor.pad_prompts([long_a, short, long_b])
    width = long_a["input_ids"].shape[1]
    assert batch["input_ids"].shape == (3, width)
    pad = width - short["input_ids"].shape[1]
    assert batch["input_ids"][1, :pad].eq(processor.tokenizer.pad_token_id).all()
    assert batch["attention_mask"][1].tolist() == [0] * pad + [1] * short["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][1, pad:], short["input_ids"][0])
    assert torch.equal(batch["mm_token_type_ids"][0], long_a["mm_token_type_ids"][0])
    assert torch.equal(batch["pixel_values"], torch.cat([long_a["pixel_values"], long_b["pixel_values"]]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([long_a["image_grid_thw"], long_b["image_grid_thw"]]))
    # the same batch as the tokenizer's own left padding of the two texts' ids
    ref = processor.tokenizer.pad(
        {"input_ids": [long_a["input_ids"][0].tolist(), short["input_ids"][0].tolist()]},
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    two = processor.pad_prompts([long_a, short])
    assert torch.equal(two["input_ids"], ref["input_ids"]) and torch.equal(two["attention_mask"], ref["attention_mask"])
    assert processor.pad_prompts([short], length=width + 2)["input_ids"].shape == (1, width + 2)


def test_bad_prompts_are_named() -> None:
    processor = _processor()
    with pytest.raises(ValueError, match="at least one prompt"):
        processor.pad_prompts([])
    with pytest.raises(ValueError, match=r"prompts \[0\] are not single rows"):
        processor.pad_prompts([{"input_ids": torch.zeros(2, 3, dtype=torch.long)}])
    audio = [{"role": "user", "content": [{"type": "audio", "audio": b""}]}]
    with pytest.raises(ValueError, match="message 0 item 0: expected an image, video or text item"):
        processor.encode_prompt(audio)
