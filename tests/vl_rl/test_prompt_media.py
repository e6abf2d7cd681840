"""Every video shape the sample format allows reaches a rollout (frame lists of images, paths, bytes; arrays).

The bug this guards: a video given as a list of frame files was read by the processor as that many video
files (``got 1 video_fps values for 8 videos``), and the error named no sample.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# vl-rl's torch-only install has neither vl-train nor numpy / Pillow
pytest.importorskip("vl_train", reason="needs vl-rl[train] (vl-train, vl-model) for rollouts and the trainer")

import numpy as np
import torch
from _rl_helpers import tiny
from _threads import one_thread
from PIL import Image

from vl_rl.config import RLConfig
from vl_rl.rollout import HFRolloutEngine, encode_prompt
from vl_rl.trainer import RLTrainer
from vl_train.data.format import DataError, JsonlDataset


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def model_and_processor() -> tuple[Any, Any]:
    return tiny()


def _frame(k: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    return np.full((*size, 3), 25 * k, dtype=np.uint8)


def _png(k: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_frame(k)).save(buffer, format="PNG")
    return buffer.getvalue()


def _prompt(sid: str, *items: dict[str, Any]) -> dict[str, Any]:
    content = [*items, {"type": "text", "text": "what moves"}]
    return {"id": sid, "messages": [{"role": "user", "content": content}], "answer": "1"}


def _videos(tmp_path: Path) -> dict[str, Any]:
    paths = []
    for k in range(8):
        Image.fromarray(_frame(k)).save(tmp_path / f"f{k}.png")
        paths.append(str(tmp_path / f"f{k}.png"))
    return {
        "frame files": paths,
        "frame images": [Image.fromarray(_frame(k)) for k in range(8)],
        "frame arrays": [_frame(k) for k in range(8)],
        "frame bytes": [_png(k) for k in range(8)],
        "uint8 array [F, H, W, C]": np.stack([_frame(k) for k in range(8)]),
        "uint8 tensor [F, C, H, W]": torch.from_numpy(np.stack([_frame(k) for k in range(8)])).permute(0, 3, 1, 2),
    }


def test_encode_prompt_reads_frame_files_as_one_video(tmp_path: Path, model_and_processor: Any) -> None:
    _, processor = model_and_processor
    paths = _videos(tmp_path)["frame files"]
    messages = _prompt("v", {"type": "video", "video": paths, "fps": 2.0})["messages"]
    inputs = processor.encode_prompt(messages)  # raised "got 1 video_fps values for 8 videos"
    assert inputs["video_grid_thw"].tolist() == [[4, 2, 4]]  # 8 frames at 2 fps, temporal patch 2
    # transformers' nesting of the processor call: a flat list of paths is a list of video files
    text = processor.render_prompt(messages)[0]
    nested = processor(text=[text], videos=[[paths]], video_fps=[2.0])
    assert nested["video_grid_thw"].tolist() == [[4, 2, 4]]


def test_every_video_shape_rolls_out(tmp_path: Path, model_and_processor: Any) -> None:
    model, processor = model_and_processor
    engine = HFRolloutEngine(model, processor, max_new_tokens=2, thinking=False)
    reference = None
    for name, video in _videos(tmp_path).items():
        sample = _prompt(name, {"type": "video", "video": video, "fps": 2.0})
        rollout = engine.generate([sample], 2)
        assert rollout.model_inputs["video_grid_thw"].tolist() == [[4, 2, 4]] * 2, name
        pixels = rollout.model_inputs["pixel_values_videos"]
        reference = pixels if reference is None else reference
        assert torch.equal(pixels, reference), f"{name}: other pixels than the same frames given otherwise"
    # two videos and an image in one prompt, several prompts in one batch
    frames = _videos(tmp_path)["frame files"]
    mixed = _prompt(
        "mixed",
        {"type": "image", "image": Image.fromarray(_frame(3))},
        {"type": "video", "video": frames, "fps": 2.0},
        {"type": "video", "video": frames[:4], "fps": 1.0},
    )
    rollout = engine.generate([mixed, _prompt("one", {"type": "video", "video": frames, "fps": 2.0})], 2)
    assert rollout.videos_per_row == [2, 2, 1, 1] and rollout.images_per_row == [1, 1, 0, 0]


def test_rl_step_on_jsonl_prompts_with_frame_videos(tmp_path: Path, model_and_processor: Any) -> None:
    model, processor = model_and_processor
    (tmp_path / "frames").mkdir()
    names = []
    for k in range(8):
        Image.fromarray(_frame(k)).save(tmp_path / "frames" / f"{k}.png")
        names.append(f"frames/{k}.png")
    rows = [_prompt(f"clip-{i}", {"type": "video", "video": names, "fps": 2.0}) for i in range(2)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = list(JsonlDataset(tmp_path / "prompts.jsonl", validate=False))
    config = RLConfig(
        group_size=2,
        prompts_per_step=2,
        max_new_tokens=2,
        max_steps=1,
        eval_every=0,
        thinking=False,
        output_dir=str(tmp_path / "run"),
        progress=False,
        plot=False,
    )
    result = RLTrainer(model, processor, config, prompts, lambda s, r: float(len(r) % 2)).train()
    assert result.steps == 1 and result.records[0]["groups"] == 2


def test_a_bad_video_names_its_sample(tmp_path: Path, model_and_processor: Any) -> None:
    model, processor = model_and_processor
    frames = [_frame(0), _frame(1, size=(32, 64))]  # frames of two sizes
    sample = {**_prompt("uneven", {"type": "video", "video": frames, "fps": 2.0}), "_source": "rl.jsonl:7"}
    with pytest.raises(DataError, match=r"sample 'uneven' at rl\.jsonl:7: .*one size"):
        encode_prompt(processor, sample)
    with pytest.raises(DataError, match="'uneven'"):
        HFRolloutEngine(model, processor, max_new_tokens=1).generate([sample], 1)
