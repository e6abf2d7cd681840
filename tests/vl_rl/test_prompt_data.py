"""The [data] recipe section: JSONL and datasets prompts in vl-train's format, checked under its policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# vl-rl's torch-only install has neither vl-train nor numpy / Pillow
pytest.importorskip("vl_train", reason="prompts are read by vl-train's readers (vl-rl[train])")

import numpy as np
from PIL import Image

from vl_rl.prompt_data import load_prompts
from vl_rl.reward_spec import build_reward
from vl_train.data.format import DataError


def write_prompts(folder: Path) -> Path:
    """A JSONL of RL prompts: one image, two images, a frame-list video, and four bad lines."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "frames").mkdir(exist_ok=True)
    for name, value in (("a", 40), ("b", 200)):
        Image.fromarray(np.full((40, 56, 3), value, dtype=np.uint8)).save(folder / f"{name}.png")
    for k in range(4):
        Image.fromarray(np.full((40, 56, 3), 30 * k, dtype=np.uint8)).save(folder / "frames" / f"{k}.png")
    (folder / "broken.png").write_bytes(b"not a png")

    def row(sid: str, items: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        content = [*items, {"type": "text", "text": "Which is brighter? Answer A or B."}]
        return {"id": sid, "messages": [{"role": "user", "content": content}], **fields}

    rows = [
        row("one", [{"type": "image", "image": "a.png"}], answer="A", task="choice"),
        row(
            "two", [{"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"}], answer="B", task="choice"
        ),
        row(
            "clip",
            [{"type": "video", "video": [f"frames/{k}.png" for k in range(4)], "fps": 2.0}],
            answer=3,
            task="count",
        ),
        row("no-answer", [{"type": "image", "image": "a.png"}], task="choice"),
        row("missing", [{"type": "image", "image": "nowhere.png"}], answer="A", task="choice"),
        row("corrupt", [{"type": "image", "image": "broken.png"}], answer="A", task="choice"),
        {"id": "no-user", "messages": [{"role": "assistant", "content": "A"}], "answer": "A"},
    ]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_prompts_with_skip_policy(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "data")
    held = tmp_path / "data" / "held.jsonl"
    held.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
    reward = build_reward({"tasks": {"choice": {"verifier": "choice"}, "count": {"verifier": "count"}}})
    section = {"kind": "jsonl", "path": str(path), "heldout_path": str(held), "heldout_size": 2, "policy": "skip"}
    data = load_prompts(section, reward)
    assert [s["id"] for s in data.train] == ["one", "two", "clip"] and [s["id"] for s in data.heldout] == ["one", "two"]
    counts = dict(data.stats.counts)
    assert counts == {
        "prompts": 3,
        "heldout_prompts": 2,
        "skipped_no_answer": 1,
        "skipped_bad_media": 2,
        "skipped_invalid": 1,
    }
    report = data.stats.report()
    assert f"'no-answer' at {path}:4: has no 'answer' for its 'choice' verifier" in report
    assert f"'missing' at {path}:5" in report and f"'corrupt' at {path}:6" in report and "no user message" in report
    # media paths were resolved against the JSONL's folder
    assert data.train[2]["messages"][0]["content"][0]["video"][0] == str(tmp_path / "data" / "frames" / "0.png")


def test_fail_policy_names_the_first_bad_prompt(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "data")
    reward = build_reward({"verifier": "choice", "tasks": {"count": {"verifier": "count"}}})
    with pytest.raises(DataError, match=rf"sample 'no-answer' at {path}:4: has no 'answer'"):
        load_prompts({"kind": "jsonl", "path": str(path)}, reward)
    # a reward that reads no answer does not ask for one; the missing photo is then the first problem
    free = build_reward({"function": "vl_rl.rewards:format_reward"})
    with pytest.raises(DataError, match=rf"'missing' at {path}:5: .*nowhere.png"):
        load_prompts({"kind": "jsonl", "path": str(path)}, free)


def test_sections_are_checked(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "data")
    only_count = build_reward({"tasks": {"count": {"verifier": "count"}}})
    with pytest.raises(
        ValueError, match=r"'one' .* has task 'choice', which no reward covers: add \[reward.tasks.choice\]"
    ):
        load_prompts({"kind": "jsonl", "path": str(path), "policy": "skip"}, only_count)
    with pytest.raises(ValueError, match=r"\[data\] keys \['tasks'\] do not apply to kind = 'jsonl'"):
        load_prompts({"kind": "jsonl", "path": str(path), "tasks": ["count"]})
    with pytest.raises(ValueError, match="needs a path"):
        load_prompts({"kind": "hf"})
    with pytest.raises(ValueError, match=r"\[data\] key 'kind' must be one of \['synthetic', 'jsonl', 'hf'\]"):
        load_prompts({"kind": "csv"})
    with pytest.raises(FileNotFoundError, match="no such JSONL"):
        load_prompts({"kind": "jsonl", "path": str(tmp_path / "none.jsonl")})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="left no training prompt"):
        load_prompts({"kind": "jsonl", "path": str(empty)})


def test_hugging_face_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")

    def row(sid: str, value: int, answer: str) -> dict[str, Any]:
        image = Image.fromarray(np.full((40, 56, 3), value, dtype=np.uint8))
        content = [{"type": "image", "image": image, "text": None}, {"type": "text", "image": None, "text": "Bright?"}]
        return {"id": sid, "task": "choice", "answer": answer, "messages": [{"role": "user", "content": content}]}

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "task": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "messages": [
                {
                    "role": datasets.Value("string"),
                    "content": [
                        {"type": datasets.Value("string"), "image": datasets.Image(), "text": datasets.Value("string")}
                    ],
                }
            ],
        }
    )
    folder = tmp_path / "hub_like"
    folder.mkdir()
    for split, rows in (("train", [row("t0", 10, "A"), row("t1", 250, "B")]), ("test", [row("e0", 99, "A")])):
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    section = {"kind": "hf", "path": str(folder), "split": "train", "heldout_split": "test"}
    data = load_prompts(section, build_reward({"verifier": "choice"}))
    assert [s["id"] for s in data.train] == ["t0", "t1"] and [s["id"] for s in data.heldout] == ["e0"]
    assert data.train[0]["_source"].endswith("[0]") and isinstance(
        data.train[1]["messages"][0]["content"][0]["image"], Image.Image
    )
