"""The path a user walks, with the CLI alone: an official-layout checkpoint + a JSONL of real photos and a video ->
SFT (labelled tokens, falling loss) -> Ctrl-C -> --resume (metrics intact) -> a model plain transformers loads and
generates with, no ``vl_*`` import. Also: every checkpoint kind brings its own processor, and a tokenizer that
does not belong to the model is an error naming both ids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

skimage_data = pytest.importorskip("skimage.data", reason="the photos come from scikit-image")

from PIL import Image  # noqa: E402

from vl_model.testing import QWEN_SPECIAL, make_official_checkpoint  # noqa: E402
from vl_train.builders import build_model  # noqa: E402


def _jsonl(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    photos = {"astronaut": skimage_data.astronaut(), "cat": skimage_data.chelsea(), "coffee": skimage_data.coffee()}
    lines = []
    for name, pixels in photos.items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
        lines.append(
            {
                "id": name,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"{name}.png"},
                            {"type": "text", "text": "what is in this photo"},
                        ],
                    },
                    {"role": "assistant", "content": f"a {name}"},
                ],
            }
        )
    frames = []
    for k in range(4):
        Image.fromarray(photos["coffee"][:, 40 * k : 40 * k + 300]).save(folder / f"frame{k}.png")
        frames.append(f"frame{k}.png")
    lines.append(
        {
            "id": "clip",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": frames, "fps": 2.0},
                        {"type": "text", "text": "describe the video"},
                    ],
                },
                {"role": "assistant", "content": "a cup of coffee"},
            ],
        }
    )
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _recipe(folder: Path, checkpoint: Path, data: Path, steps: int) -> Path:
    path = folder / "sft.toml"
    path.write_text(
        f"""
preset = "SFT"
[model]
init_from = "{checkpoint.as_posix()}"
[data]
kind = "jsonl"
path = "{data.as_posix()}"
[optim]
lr = 3e-3
warmup_steps = 0
min_lr_ratio = 1.0
[train]
max_steps = {steps}
max_length = 512
micro_batch_size = 2
activation_checkpointing = false
save_every = 1
tensorboard = false
plot = false
progress = false
"""
    )
    return path


def _cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vl_train", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _steps(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3_vl", "qwen3_vl_moe"])
def test_sft_from_an_official_checkpoint_ctrl_c_resume_and_transformers(tmp_path: Path, moe: bool) -> None:
    checkpoint = make_official_checkpoint(tmp_path / "Qwen3-VL-tiny", moe=moe)
    recipe = _recipe(tmp_path, checkpoint, _jsonl(tmp_path / "data"), steps=200)
    out = tmp_path / "run"
    proc = _cli(str(recipe), "--output", str(out))
    deadline = time.monotonic() + 240
    while len(_steps(out)) < 2:  # let it train a couple of steps, then Ctrl-C
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130 and "Traceback" not in err and "--resume" in err, err
    done = len(_steps(out))
    resumed = _cli(str(recipe), "--output", str(out), "--resume", "--set", f"train.max_steps={done + 3}")
    printed, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed from {out / f'checkpoint-{done:08d}'} at step {done}" in printed
    records = _steps(out)
    assert [r["step"] for r in records] == list(range(1, done + 4))  # intact: nothing lost, nothing twice
    assert records[-1]["loss"] < records[0]["loss"] and all(r["data/rendered"] > 0 for r in records)
    model_dir = out / "model"
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == ("qwen3_vl_moe" if moe else "qwen3_vl")
    # plain transformers, in a fresh interpreter without any vl_* package imported
    code = f"""
import sys, torch, transformers
from PIL import Image
model = transformers.AutoModelForImageTextToText.from_pretrained({str(model_dir)!r}).eval()
tok = transformers.AutoTokenizer.from_pretrained({str(model_dir)!r})
image_processor = transformers.AutoImageProcessor.from_pretrained({str(model_dir)!r})
image = Image.open({str(tmp_path / "data" / "cat.png")!r})
pixels = image_processor(images=[image], return_tensors="pt")
n = int(pixels["image_grid_thw"].prod(-1).sum()) // 4
text = "<|im_start|>user\\n<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>what is in this photo<|im_end|>\\n<|im_start|>assistant\\n"
ids = tok(text, return_tensors="pt", add_special_tokens=False)
out = model.generate(**ids, **pixels, max_new_tokens=3, do_sample=False)
print(type(model).__name__, out.shape[1] > ids["input_ids"].shape[1], tok.convert_tokens_to_ids("<|image_pad|>"))
print([m for m in sys.modules if m.startswith("vl_")])
"""
    done_proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done_proc.returncode == 0, done_proc.stderr
    first, second = done_proc.stdout.splitlines()[-2:]
    kind = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
    assert first == f"{kind} True {QWEN_SPECIAL['<|image_pad|>']}" and second == "[]"


def test_every_checkpoint_kind_brings_its_own_processor(tmp_path: Path) -> None:
    from vl_model import VLProcessor, compose
    from vl_train.testing import TINY_TEXT, TINY_VISION

    official = make_official_checkpoint(tmp_path / "official")
    model, processor = build_model({"init_from": str(official)})
    assert processor.image_token_id == QWEN_SPECIAL["<|image_pad|>"] == model.config.image_token_id
    assert processor.image_processor.patch_size == 16 and processor.image_processor.max_pixels == 32 * 32 * 16
    ours = tmp_path / "ours"
    model, processor = build_model({"tokenizer": "demo", "text": TINY_TEXT, "vision": TINY_VISION})
    model.save_pretrained(str(ours))
    processor.save_pretrained(str(ours))
    assert build_model({"init_from": str(ours)})[1].tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    composed = compose(model.vision_tower().config, _qwen3_config(model), **_ids(model))
    composed.save_pretrained(str(tmp_path / "composed"))
    processor.save_pretrained(str(tmp_path / "composed"))
    loaded, its = build_model({"init_from": str(tmp_path / "composed")})
    assert type(loaded).__name__ == "ComposedVLForConditionalGeneration" and isinstance(its, VLProcessor)


def _qwen3_config(model: Any) -> Any:
    from transformers import Qwen3Config

    text = model.config.text_config
    return Qwen3Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
    )


def _ids(model: Any) -> dict[str, int]:
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {k: getattr(model.config, k) for k in names}


def test_a_tokenizer_of_another_model_is_an_error_naming_both_ids(tmp_path: Path) -> None:
    official = make_official_checkpoint(tmp_path / "official")
    with pytest.raises(
        ValueError, match=r"the tokenizer's <\|image_pad\|> is id \d+ but the model config's image_token_id is 151655"
    ):
        build_model({"init_from": str(official), "tokenizer": "demo"})
