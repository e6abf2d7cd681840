"""RL on a user's own data with the ``vl-rl`` CLI alone: a JSONL of prompts with answers and tasks (photos as files,
several images per prompt, a frame-list video) -> a recipe with the pre-filter and curriculum keys -> Ctrl-C
(exit 130 and the resume command) -> ``--resume`` (says where, metrics intact) -> the model in the official layout.
Also: both packaged recipes run on a tiny official checkpoint, a composed checkpoint trains and stays composed,
a folder holding a run needs ``--overwrite``, and a run without learning signal ends with a printed warning.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vl_model.testing import make_official_checkpoint
from vl_rl.cli import main
from vl_rl.trainer import RLTrainer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in for an SFT'd model in the official layout (its own tokenizer and preprocessor files)."""
    return make_official_checkpoint(tmp_path_factory.mktemp("ckpt") / "Qwen3-VL-tiny")


def write_prompts(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "frames").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("red", "blue", "green"):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    for k in range(4):
        Image.fromarray(np.full((64, 64, 3), 40 * k, dtype=np.uint8)).save(folder / "frames" / f"{k}.png")

    def prompt(sid: str, task: str, answer: Any, items: list[dict[str, Any]], text: str) -> dict[str, Any]:
        content = [*items, {"type": "text", "text": text}]
        return {"id": sid, "task": task, "answer": answer, "messages": [{"role": "user", "content": content}]}

    image = lambda n: {"type": "image", "image": f"{n}.png"}
    rows = [
        prompt("c1", "choice", "A", [image("red")], "what is in this photo? A) a cat B) a cup"),
        prompt("c2", "choice", "B", [image("red"), image("blue")], "which photo is brighter? A) first B) second"),
        prompt("n1", "count", 2, [image("green")], "how many cats are there"),
        prompt(
            "n2",
            "count",
            3,
            [{"type": "video", "video": [f"frames/{k}.png" for k in range(4)], "fps": 2.0}],
            "how many frames are dark",
        ),
    ]
    rows.append(
        {
            "id": "broken",
            "task": "choice",
            "answer": "A",
            "messages": [{"role": "user", "content": [image("missing"), {"type": "text", "text": "what"}]}],
        }
    )
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return folder


def write_recipe(folder: Path, checkpoint: Path, data: Path, **rl: Any) -> Path:
    settings = {
        "group_size": 2,
        "prompts_per_step": 2,
        "mini_batches": 1,
        "max_new_tokens": 3,
        "max_steps": 2,
        "eval_every": 0,
        "save_every": 1,
        "thinking": False,
        "progress": False,
        "plot": False,
        "prefilter_rollouts": 2,
        "prefilter_high": 1.0,
        "prefilter_drop_all_wrong": False,
        "task_ratios": {"choice": 1.0, "count": 1.0},
        **rl,
    }
    lines = "\n".join(
        f"{k} = {_table(v) if isinstance(v, dict) else json.dumps(v)}" for k, v in settings.items() if v is not None
    )
    recipe = folder / "my.toml"
    recipe.write_text(
        f'[model]\ninit_from = "{checkpoint.as_posix()}"\nmax_pixels = 16384\n\n'
        f'[data]\nkind = "jsonl"\npath = "{(data / "train.jsonl").as_posix()}"\n'
        f'heldout_path = "{(data / "heldout.jsonl").as_posix()}"\npolicy = "skip"\n\n'
        f"[optim]\nlr = 1e-3\n\n[rl]\n{lines}\n\n"
        '[reward]\nfunction = "rl_user_rewards:longer"\nrepetition_weight = 0.1\n'
        '[reward.tasks.choice]\nverifier = "choice"\n'
    )
    return recipe


def _table(values: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + " }"


@pytest.fixture
def user_rewards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's own reward module: the longer the response, the better (so the tiny random policy has signal)."""
    (tmp_path / "rl_user_rewards.py").write_text(
        "def longer(prompt, response, sample):\n    return len(response.split()) / 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_rl_on_my_data_ctrl_c_resume_official_layout(
    tmp_path: Path,
    checkpoint: Path,
    user_rewards: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = write_prompts(tmp_path / "data")
    recipe = write_recipe(tmp_path, checkpoint, data)
    out = tmp_path / "runs" / "rl"
    original = RLTrainer.after_step

    def ctrl_c_after_step_1(self: RLTrainer, record: dict[str, Any]) -> None:
        original(self, record)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in the terminal does

    monkeypatch.setattr(RLTrainer, "after_step", ctrl_c_after_step_1)
    assert main([str(recipe), "--output", str(out)]) == 130
    printed = capsys.readouterr()
    assert "vl-rl: data: heldout_prompts 2, prompts 4, skipped_bad_media 1" in printed.out
    assert f"'broken' at {data / 'train.jsonl'}:5" in printed.out
    assert f"continue with `vl-rl {recipe} --output {out} --resume`" in printed.err
    assert (out / "prefilter" / "kept.jsonl").is_file() and not (out / "model").exists()
    monkeypatch.setattr(RLTrainer, "after_step", original)

    assert main([str(recipe), "--output", str(out)]) == 2  # the folder holds a run
    assert "--resume" in capsys.readouterr().err
    assert main([str(recipe), "--output", str(out), "--resume"]) == 0
    printed = capsys.readouterr()
    assert f"vl-rl: resumed from {out / 'checkpoint-00000001'} at step 1" in printed.out
    assert "pass-rate filter kept 4 of 4 prompts" in printed.out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["groups"] == 2 for r in records)
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == "qwen3_vl"
    assert (out / "model" / "preprocessor_config.json").is_file()
    assert main([str(recipe), "--output", str(out), "--overwrite", "--set", "rl.max_steps=1"]) == 0


@pytest.mark.parametrize("name", ["qwen3_vl_rl", "glm45v_rl"])
def test_packaged_recipes_run_on_an_official_checkpoint(
    name: str, tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_prompts(tmp_path / "data")
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    tasks = {"qwen3_vl_rl": ["math", "counting", "grounding", "ocr", "chart"], "glm45v_rl": ["math", "ocr"]}[name]
    answers = {"math": "2", "counting": 2, "grounding": [[0, 0, 10, 10]], "ocr": "abc", "chart": "7"}
    prompts = [{**rows[k % 4], "id": f"p{k}", "task": t, "answer": answers[t]} for k, t in enumerate(tasks)]
    (data / "mine.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    overrides = [
        f"data.path={(data / 'mine.jsonl').as_posix()}",
        f"data.heldout_path={(data / 'mine.jsonl').as_posix()}",
        "data.heldout_size=1",
        "rl.group_size=2",
        f"rl.prompts_per_step={len(tasks)}",
        "rl.mini_batches=1",
        "rl.max_new_tokens=3",
        "rl.answer_tokens=2",
        "rl.max_steps=1",
        "rl.eval_every=0",
        "rl.save_every=0",
        "rl.prefilter_rollouts=2",
        "rl.prefilter_drop_all_wrong=false",
        "rl.prefilter_high=1.0",
        "rl.max_sample_rounds=1",
        "rl.progress=false",
        "optim.warmup_steps=0",
        "rl.trainable=['llm']",
        "model.max_pixels=16384",
    ]
    args = [name, "--init-from", str(checkpoint), "--output", str(tmp_path / name)]
    assert main([*args, *(x for o in overrides for x in ("--set", o))]) == 0
    printed = capsys.readouterr()
    assert "held-out reward" in printed.out
    assert "vl-rl: warning:" in printed.err and "no learning signal" in printed.err  # a random policy scores 0
    assert json.loads((tmp_path / name / "model" / "config.json").read_text())["model_type"] == "qwen3_vl"


def test_a_composed_checkpoint_trains_and_stays_composed(tmp_path: Path, user_rewards: None) -> None:
    from transformers import Qwen3Config

    from vl_model import compose
    from vl_train.builders import build_model
    from vl_train.testing import TINY_TEXT, TINY_VISION

    model, processor = build_model({"tokenizer": "demo", "text": TINY_TEXT, "vision": TINY_VISION})
    text = model.config.text_config
    lm = Qwen3Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
    )
    ids = {
        k: getattr(model.config, k)
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    folder = tmp_path / "composed"
    compose(model.vision_tower().config, lm, **ids).save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    data = write_prompts(tmp_path / "data")
    recipe = write_recipe(tmp_path, folder, data, max_steps=1, prefilter_rollouts=0, task_ratios=None)
    assert main([str(recipe), "--output", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["model_type"] == "vl_composed"
