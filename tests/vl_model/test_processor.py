"""VLProcessor: token layout parity with transformers' Qwen3VLProcessor, chat template, save/load."""

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

from vl_model.processing import VLProcessor
from vl_vision.processing import ImageProcessor, VideoProcessor

BUDGET = {"min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 16}  # 4..16 merged tokens per image
VIDEO_BUDGET = {"min_pixels": 32 * 32 * 4, "max_pixels": 32 * 32 * 64}
KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def _ours() -> VLProcessor:
    return VLProcessor(
        ImageProcessor(**BUDGET, num_threads=1),
        VideoProcessor(**VIDEO_BUDGET, fps=2.0, min_frames=2, max_frames=16, num_threads=1),
        make_tokenizer(),
    )


def _image(h: int, w: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _video(frames: int = 8, h: int = 64, w: int = 96) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def _theirs(ours: VLProcessor) -> Any:
    """transformers' Qwen3VLProcessor on the same tokenizer, with its PIL image processor.

    Its video processor needs torchvision (not installed here), so the video side is a
    ``Qwen3VLVideoProcessor`` whose pixel step is ours; the placeholder layout (timestamps, pads)
    is still built by transformers' processor from the grid and the frame metadata.
    """
    qwen3 = pytest.importorskip("transformers.models.qwen3_vl.processing_qwen3_vl")
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    vid = pytest.importorskip("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    from transformers.video_utils import VideoMetadata

    image_processor = pil.Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": BUDGET["min_pixels"], "longest_edge": BUDGET["max_pixels"]},
    )

    class VideoStub(vid.Qwen3VLVideoProcessor):  # type: ignore[misc, name-defined]
        def __call__(self, videos: Any, **kwargs: Any) -> dict[str, Any]:
            fps = kwargs.get("video_metadata") or [24.0]
            out = ours.video_processor(videos, [m["fps"] for m in fps])
            meta = [
                VideoMetadata(total_num_frames=len(v), fps=m["fps"], frames_indices=idx)
                for v, m, idx in zip(videos, fps, out["frame_indices"])
            ]
            return {
                "pixel_values_videos": out["pixel_values_videos"],
                "video_grid_thw": out["video_grid_thw"],
                "video_metadata": meta,
            }

    class Theirs(qwen3.Qwen3VLProcessor):  # type: ignore[misc, name-defined]
        # the class check looks the video base class up in a registry that needs torchvision
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> type:
            return type(argument)

    video_processor = VideoStub(patch_size=16, temporal_patch_size=2, merge_size=2)
    return Theirs(image_processor, ours.tokenizer, video_processor)


def _same(a: Any, b: Any) -> None:
    for key in (*KEYS, "image_grid_thw", "video_grid_thw"):
        assert (key in a) == (key in b), key
        if key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.mark.parametrize(
    "case",
    ["text", "one_image", "two_images", "batch_padded"],
)
def test_layout_matches_transformers(case: str) -> None:
    ours = _ours()
    theirs = _theirs(ours)
    a, b = _image(70, 50), _image(120, 200, seed=1)
    if case == "text":
        args: dict[str, Any] = {"text": "hello , what is this ?"}
    elif case == "one_image":
        args = {"text": f"<|im_start|>user\n{IMG}describe this<|im_end|>\n", "images": [a]}
    elif case == "two_images":
        args = {"text": f"compare {IMG} and {IMG} please", "images": [a, b]}
    else:
        args = {"text": [f"{IMG}{IMG} two", f"short {IMG}"], "images": [[a, b], [b]], "padding": True}
    got = ours(**args, return_tensors="pt")
    want = theirs(**args, return_tensors="pt")
    _same(got, want)
    if "images" in args:
        merged = int((got["image_grid_thw"].prod(-1) // 4).sum())
        assert int((got["mm_token_type_ids"] == 1).sum()) == merged
        assert (got["pixel_values"] - torch.as_tensor(want["pixel_values"])).abs().max() <= 0.02


def test_left_padding_matches_transformers() -> None:
    ours = _ours()
    theirs = _theirs(ours)
    args = {"text": [f"{IMG} long long long text", "hi"], "images": [_image(64, 64)], "padding": True}
    got = ours(**args, padding_side="left", return_tensors="pt")
    _same(got, theirs(**args, padding_side="left", return_tensors="pt"))
    assert got["attention_mask"][1, 0] == 0 and got["input_ids"][1, 0] == ours.tokenizer.pad_token_id


def test_video_layout_matches_transformers() -> None:
    ours = _ours()
    theirs = _theirs(ours)
    text = f"<|im_start|>user\n{VID}what is in the video ?<|im_end|>\n"
    video = _video(frames=10)
    got = ours(text=text, videos=[video], video_fps=4.0, return_tensors="pt")
    want = theirs(text=text, videos=[video], video_metadata=[{"fps": 4.0}], return_tensors="pt")
    _same(got, want)
    t, h, w = got["video_grid_thw"][0].tolist()
    assert t == 3  # 10 frames at 4 fps -> 2.5 s at 2 fps -> 5 frames -> padded to 6 -> 3 temporal patches
    decoded = ours.tokenizer.decode(got["input_ids"][0])
    assert decoded.count("seconds>") == t
    assert int((got["mm_token_type_ids"] == 2).sum()) == t * h * w // 4


def test_video_layout_by_hand() -> None:
    ours = _ours()
    video = _video(frames=8)
    out = ours(text=f"a {VID} b", videos=video, video_fps=2.0)
    t, h, w = out["video_grid_thw"][0].tolist()
    stamps = ours.video_processor(video, 2.0)["timestamps"][0]
    assert stamps == ["<0.2 seconds>", "<1.2 seconds>", "<2.2 seconds>", "<3.2 seconds>"][:t]
    run = "".join(f"{s}<|vision_start|>{'<|video_pad|>' * (h * w // 4)}<|vision_end|>" for s in stamps)
    want = ours.tokenizer(f"a <|vision_start|>{run}<|vision_end|> b")["input_ids"]
    assert out["input_ids"][0] == want
    assert out["pixel_values_videos"].shape[0] == t * h * w


def test_counts_must_match() -> None:
    ours = _ours()
    with pytest.raises(ValueError, match=r"2 <\|image_pad\|> placeholders but 1 images"):
        ours(text=f"{IMG}{IMG}", images=[_image(64, 64)])
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> placeholders but 0 images"):
        ours(text=IMG)
    with pytest.raises(ValueError, match=r"0 <\|video_pad\|> placeholders but 1 videos"):
        ours(text="no video", videos=[_video()], video_fps=2.0)
    with pytest.raises(ValueError, match="truncation must not cut"):
        ours(text=f"hi {IMG}", images=[_image(64, 64)], truncation=True, max_length=4)


def _chat(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    return list(messages)


def test_chat_template_thinking_modes() -> None:
    ours = _ours()
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe this"}]}
    on = ours.apply_chat_template([user], add_generation_prompt=True)
    assert on == f"<|im_start|>user\n{IMG}describe this<|im_end|>\n<|im_start|>assistant\n"
    off = ours.apply_chat_template([user], add_generation_prompt=True, enable_thinking=False)
    assert off == on + "<think>\n\n</think>\n\n"
    soft_off = {"role": "user", "content": "hello /nothink"}
    assert ours.apply_chat_template([soft_off], add_generation_prompt=True).endswith(
        "assistant\n<think>\n\n</think>\n\n"
    )
    # the most recent switch wins; enable_thinking=False is a hard switch
    history = [soft_off, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "why ? /think"}]
    assert ours.apply_chat_template(history, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    hard = ours.apply_chat_template(history, add_generation_prompt=True, enable_thinking=False)
    assert hard.endswith("<think>\n\n</think>\n\n")
    assert ours.apply_chat_template([{"role": "user", "content": "x /no_think"}], add_generation_prompt=True).endswith(
        "</think>\n\n"
    )


def test_chat_template_history_and_media() -> None:
    ours = _ours()
    convo = [
        {"role": "system", "content": "you are a helpful assistant"},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what"}]},
        {"role": "assistant", "content": "<think>\nold\n</think>\n\nfirst answer"},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "compare"}]},
        {"role": "assistant", "content": "second answer", "reasoning_content": "look"},
    ]
    text = ours.apply_chat_template(convo, add_vision_id=True)
    assert text == (
        "<|im_start|>system\nyou are a helpful assistant<|im_end|>\n"
        f"<|im_start|>user\nVideo 1: {VID}what<|im_end|>\n"
        "<|im_start|>assistant\nfirst answer<|im_end|>\n"  # earlier reasoning is dropped
        f"<|im_start|>user\nPicture 1: {IMG}Picture 2: {IMG}compare<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nlook\n</think>\n\nsecond answer<|im_end|>\n"
    )
    # a final answer without reasoning gets the empty (non-thinking) block
    final = ours.apply_chat_template([convo[1], {"role": "assistant", "content": "ok"}])
    assert final.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nok<|im_end|>\n")


def test_chat_template_tokenize_with_images_and_assistant_mask() -> None:
    ours = _ours()
    convo = [
        {"role": "user", "content": [{"type": "image", "image": _image(64, 96)}, {"type": "text", "text": "what"}]},
        {"role": "assistant", "content": "a cat"},
    ]
    out = ours.apply_chat_template(
        convo, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    assert int((out["mm_token_type_ids"] == 1).sum()) == int(out["image_grid_thw"].prod() // 4)
    answer = ours.tokenizer.decode(ids[mask.bool()])
    assert answer == "<think>\n\n</think>\n\na cat<|im_end|>"


def test_tools_render() -> None:
    ours = _ours()
    tools = [{"type": "function", "function": {"name": "time", "parameters": {}}}]
    call = {"type": "function", "function": {"name": "time", "arguments": {"a": 1}}}
    convo = [
        {"role": "user", "content": "time ?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "3"},
    ]
    text = ours.apply_chat_template(convo, tools=tools, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n") and '"name": "time"' in text
    assert '<tool_call>\n{"name": "time", "arguments": {"a": 1}}\n</tool_call><|im_end|>' in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_decode_and_post_process() -> None:
    ours = _ours()
    ids = ours.tokenizer("<think>\n\n</think>\n\nhello cat<|im_end|>")["input_ids"]
    assert ours.batch_decode([ids], skip_special_tokens=True) == ["\n\n\n\nhello cat"]
    assert ours.post_process_image_text_to_text(torch.tensor([ids])) == ["\n\n\n\nhello cat"]
    assert ours.decode(ids) == "<think>\n\n</think>\n\nhello cat<|im_end|>"


def test_save_load_round_trip(tmp_path: Path) -> None:
    ours = VLProcessor(
        ImageProcessor(min_pixels=32 * 32 * 2, max_pixels=32 * 32 * 9, merge_size=2),
        VideoProcessor(fps=1.0, max_frames=8, timestamp_style="hms"),
        make_tokenizer(),
        chat_template="{{ messages[0].content }}",
    )
    ours.save_pretrained(tmp_path)
    back = VLProcessor.from_pretrained(tmp_path)
    assert back.to_dict() == ours.to_dict()
    assert back.chat_template == "{{ messages[0].content }}"
    assert back.video_processor.timestamp_style == "hms" and back.image_processor.max_pixels == 32 * 32 * 9
    args = {"text": [f"{IMG} hi", "x"], "images": [_image(50, 80)], "padding": True, "return_tensors": "pt"}
    _same(back(**args), ours(**args))
    default = _ours()
    default.save_pretrained(tmp_path / "d")
    assert VLProcessor.from_pretrained(tmp_path / "d").chat_template == default.chat_template


def test_reads_official_preprocessor_configs(tmp_path: Path) -> None:
    import json

    make_tokenizer().save_pretrained(tmp_path)
    size = {"shortest_edge": 4096, "longest_edge": 65536}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16, "merge_size": 2, "size": size}))
    video = {"patch_size": 16, "temporal_patch_size": 2, "fps": 1.5, "max_frames": 32, "size": size}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video))
    proc = VLProcessor.from_pretrained(tmp_path)
    assert (proc.image_processor.min_pixels, proc.image_processor.max_pixels) == (4096, 65536)
    assert (proc.video_processor.fps, proc.video_processor.max_frames) == (1.5, 32)
