"""Processor files: official checkpoints load through AutoProcessor after ``import vl_model`` without torchvision,
and what ``VLProcessor.save_pretrained`` writes is the official layout that plain transformers reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vl_model import VLProcessor
from vl_model.testing import INSTRUCT_TEMPLATE, QWEN_SPECIAL, make_official_checkpoint
from vl_vision.processing import ImageProcessor, VideoProcessor

HERE = Path(__file__).parent
NO_TORCHVISION = __import__("importlib").util.find_spec("torchvision") is None


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_official_checkpoint(tmp_path_factory.mktemp("official") / "Qwen3-VL-tiny")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=HERE)


@pytest.mark.skipif(not NO_TORCHVISION, reason="with torchvision, transformers' own Qwen3VLProcessor loads it")
def test_auto_processor_loads_an_official_checkpoint_after_import_vl_model(official: Path) -> None:
    code = f"""
from transformers import AutoProcessor
try:
    AutoProcessor.from_pretrained({str(official)!r})
except ImportError as exc:
    print("without vl_model:", "torchvision" in str(exc).lower())
import vl_model
processor = AutoProcessor.from_pretrained({str(official)!r})
print(type(processor).__name__, processor.image_token_id, processor.image_processor.max_pixels)
"""
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert "without vl_model: True" in done.stdout
    assert f"VLProcessor {QWEN_SPECIAL['<|image_pad|>']} {32 * 32 * 16}" in done.stdout


def test_saved_files_are_the_official_layout_plain_transformers_reads(tmp_path: Path, official: Path) -> None:
    processor = VLProcessor.from_pretrained(str(official))
    processor.image_processor = ImageProcessor(16, 2, 2, min_pixels=4096, max_pixels=8192, min_side=3)
    processor.video_processor = VideoProcessor(
        16, 2, 2, min_pixels=4096, max_pixels=65536, fps=1.5, max_frames=6, timestamp_style="hms", max_frame_tokens=64
    )
    out = tmp_path / "saved"
    processor.save_pretrained(out)
    image = json.loads((out / "preprocessor_config.json").read_text())
    video = json.loads((out / "video_preprocessor_config.json").read_text())
    assert image["processor_class"] == video["processor_class"] == "Qwen3VLProcessor"
    assert image["image_processor_type"] == "Qwen2VLImageProcessorFast"
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert image["size"] == {"shortest_edge": 4096, "longest_edge": 8192} and video["fps"] == 1.5
    assert not (out / "processor_config.json").exists()
    code = f"""
from transformers import AutoImageProcessor, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
image = AutoImageProcessor.from_pretrained({str(out)!r})
print(tok.convert_tokens_to_ids("<|image_pad|>"), image.size["shortest_edge"], image.size["longest_edge"], image.patch_size)
print(open({str(out / "chat_template.jinja")!r}).read() == {INSTRUCT_TEMPLATE!r})
import sys
print([m for m in sys.modules if m.startswith("vl_")])
"""
    done = _run(code)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{QWEN_SPECIAL['<|image_pad|>']} 4096 8192 16" and lines[1] == "True" and lines[2] == "[]"
    again = VLProcessor.from_pretrained(str(out))
    assert again.to_dict() == processor.to_dict()  # every setting, ours (vl_*) included, round-trips
    assert (again.image_processor.min_side, again.video_processor.timestamp_style) == (3, "hms")
    assert again.video_processor.max_frame_tokens == 64 and again.chat_template == INSTRUCT_TEMPLATE
