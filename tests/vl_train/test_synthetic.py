"""Tests of vl_train.data.synthetic: determinism, disjoint splits, ground truth re-derived from pixels, verify()."""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

import numpy as np
import PIL.Image
import pytest

from vl_train.data._shapes import COLOURS, KINDS, box_to_1000
from vl_train.data.format import validate_sample
from vl_train.data.synthetic import TASK_NAMES, SyntheticDataset, content_hash, final_answer, verify

Blob = tuple[str, str, tuple[int, int, int, int]]  # (colour, kind, pixel box with exclusive ends)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask: runs of each row, merged with touching runs of the row above."""
    runs: list[tuple[int, int, int]] = []  # (row, start, end) with exclusive end
    parent: list[int] = []

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    ys, xs = np.nonzero(np.diff(padded, axis=1))  # run starts and ends alternate within each row
    previous: list[int] = []
    current: list[int] = []
    last_y = -1
    for y, x0, x1 in zip(ys[::2].tolist(), xs[::2].tolist(), xs[1::2].tolist()):
        if y != last_y:
            previous, current, last_y = (current if y == last_y + 1 else []), [], y
        runs.append((y, x0, x1))
        parent.append(len(parent))
        current.append(len(runs) - 1)
        for j in previous:
            if runs[j][1] <= x1 and x0 <= runs[j][2]:  # overlapping or diagonal neighbours
                parent[root(j)] = root(len(runs) - 1)
    groups: dict[int, np.ndarray] = {}
    for i, (y, x0, x1) in enumerate(runs):
        groups.setdefault(root(i), np.zeros_like(mask))[y, x0:x1] = True
    return list(groups.values())


def _blobs(image: PIL.Image.Image) -> list[Blob]:
    """Every shape in an image, found from its pixels alone: colour by exact RGB, kind by fill ratio."""
    rgb = np.asarray(image).astype(np.int32)
    out = []
    for name, value in COLOURS.items():
        for comp in _components(np.all(rgb == value, axis=2)):
            ys, xs = np.nonzero(comp)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            fill = comp.sum() / ((box[2] - box[0]) * (box[3] - box[1]))
            kind = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle" if fill > 0.485 else "star"
            out.append((name, kind, box))
    return out


def _media(sample: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in sample["messages"][0]["content"] if c["type"] != "text"]


def _prompt(sample: dict[str, Any]) -> str:
    return sample["messages"][0]["content"][-1]["text"]


def _reply(sample: dict[str, Any]) -> str:
    return sample["messages"][1]["content"][0]["text"]


def _x_center(blob: Blob) -> float:
    return (blob[2][0] + blob[2][2]) / 2


def _check_image_task(sample: dict[str, Any]) -> None:
    """Recompute a still-image answer from the pixels and compare with the generator's answer."""
    task, answer, prompt = sample["task"], sample["answer"], _prompt(sample)
    images = [m["image"] for m in _media(sample)]
    blobs = _blobs(images[0])
    if task == "caption":
        assert Counter(answer) == Counter(f"{c} {k}" for c, k, _ in blobs)
        xs = [_x_center(b) for b in sorted(blobs, key=lambda b: (_x_center(b), b[2][1]))]
        assert xs == sorted(xs) and len(answer) == len(blobs)
    elif task == "count":
        m = re.match(r"How many (\w+) shapes are", prompt) or re.match(r"How many (\w+)s are", prompt)
        assert m is not None
        word = m.group(1)
        assert answer == sum(word in (c, k) for c, k, _ in blobs)
    elif task == "colour":
        kind = re.match(r"What colour is the (\w+)\?", prompt).group(1)  # type: ignore[union-attr]
        (hit,) = [b for b in blobs if b[1] == kind]
        assert hit[0] == answer
    elif task == "spatial":
        m = re.match(r"Is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?", prompt)
        assert m is not None
        (a,) = [b[2] for b in blobs if b[:2] == (m.group(1), m.group(2))]
        (b,) = [b[2] for b in blobs if b[:2] == (m.group(4), m.group(5))]
        truth = {
            "to the left of": a[2] <= b[0],
            "to the right of": b[2] <= a[0],
            "above": a[3] <= b[1],
            "below": b[3] <= a[1],
        }
        opposite = {
            "to the left of": b[2] <= a[0],
            "to the right of": a[2] <= b[0],
            "above": b[3] <= a[1],
            "below": a[3] <= b[1],
        }
        rel = m.group(3)
        assert truth[rel] != opposite[rel]  # never ambiguous: the boxes are apart on the asked axis
        assert answer == ("yes" if truth[rel] else "no")
    elif task == "grounding":
        w, h = images[0].size
        m = re.match(r"Locate the (\w+) (\w+) in", prompt)
        if m:
            expected = [box_to_1000(b[2], w, h) for b in blobs if b[:2] == (m.group(1), m.group(2))]
        else:
            kind = re.match(r"Locate every (\w+) in", prompt).group(1)  # type: ignore[union-attr]
            expected = [box_to_1000(b[2], w, h) for b in sorted(blobs, key=_x_center) if b[1] == kind]
        assert sorted(answer) == sorted(expected) and len(expected) >= 1
    elif task == "compare":
        m = re.search(r"more (\w+) shapes", prompt)
        counts = [sum(m is None or b[0] == m.group(1) for b in _blobs(im)) for im in images]
        assert counts[0] != counts[1]
        assert answer == ("first" if counts[0] > counts[1] else "second")


def _check_video_task(sample: dict[str, Any]) -> None:
    """The timestamp answer equals (first frame where it happens) / fps, found from the frames' pixels."""
    (video,) = _media(sample)
    frames, fps = video["video"], video["fps"]
    per_frame = [_blobs(f) for f in frames]
    for label, t in sample["answer"]:
        colour, kind = label.split()
        boxes = [[b[2] for b in blobs if b[:2] == (colour, kind)] for blobs in per_frame]
        if sample["task"] == "video_appear":
            first = next(i for i, bx in enumerate(boxes) if bx)
            assert first >= 1 and all(bx for bx in boxes[first:])
        else:
            assert all(len(bx) == 1 for bx in boxes)
            first = next(i for i, bx in enumerate(boxes) if bx != boxes[0])
        assert t == pytest.approx(first / fps)


def _solve_math(prompt: str) -> int:
    """Independent solution of the word problems from their wording."""
    a, b, *rest = (int(v) for v in re.findall(r"\d+", prompt))
    if "rows" in prompt:
        return a * b
    if "more" in prompt and "erases" in prompt:
        return a + b - rest[0]
    return a + b if "more" in prompt else a - b


@pytest.fixture(scope="module")
def samples_by_task() -> dict[str, list[dict[str, Any]]]:
    return {t: list(SyntheticDataset(size=50, seed=1, tasks=[t], thinking=1.0)) for t in TASK_NAMES}


def test_every_task_valid_and_answers_match_the_pixels(samples_by_task: dict[str, list[dict[str, Any]]]) -> None:
    for task, samples in samples_by_task.items():
        assert len(samples) == 50
        for s in samples:
            validate_sample(s)
            assert s["task"] == task and isinstance(s["reasoning"], str) and s["reasoning"]
            assert verify(s, _reply(s)) == 1.0, (s["id"], _reply(s))
            assert verify(s, f"<think>\n{s['reasoning']}\n</think>\n\n{_reply(s)}") == 1.0
            if task.startswith("video"):
                _check_video_task(s)
            elif task == "text_math":
                assert not _media(s) and s["answer"] == _solve_math(_prompt(s))
            else:
                _check_image_task(s)


def test_determinism_same_seed_same_bytes() -> None:
    a, b = SyntheticDataset(size=18, seed=5), SyntheticDataset(size=18, seed=5)
    for i in range(18):
        sa, sb = a[i], b[i]
        assert content_hash(sa) == content_hash(sb)
        assert (sa["answer"], _reply(sa), sa.get("reasoning")) == (sb["answer"], _reply(sb), sb.get("reasoning"))
    other = SyntheticDataset(size=18, seed=6)
    assert sum(content_hash(a[i]) == content_hash(other[i]) for i in range(18)) == 0


def test_splits_are_disjoint() -> None:
    def hashes(split: str, tasks: list[str] | None, n: int) -> set[str]:
        return {content_hash(s) for s in SyntheticDataset(split, size=n, seed=0, tasks=tasks)}  # type: ignore[arg-type]

    train, held = hashes("train", None, 180), hashes("heldout", None, 180)
    assert len(train) == 180 and len(held) == 180 and not train & held
    # text-only prompts come from the smallest space: the likeliest place for a collision
    assert not hashes("train", ["text_math"], 400) & hashes("heldout", ["text_math"], 400)


def test_image_sizes_vary_within_range() -> None:
    ds = SyntheticDataset(size=60, seed=2, tasks=["caption", "count"], image_size_range=(64, 128))
    sizes = {m["image"].size for s in ds for m in _media(s)}
    assert len(sizes) > 20
    assert all(64 <= v <= 128 for size in sizes for v in size)
    assert len({w for w, _ in sizes}) > 10 and any(w != h for w, h in sizes)


@pytest.mark.parametrize("grid", [16, 32])
def test_grid_puts_every_still_shape_in_one_cell(grid: int) -> None:
    image_tasks = [t for t in TASK_NAMES if not t.startswith("video") and t != "text_math"]
    ds = SyntheticDataset(size=80, seed=4, tasks=image_tasks, image_size_range=(64, 128), grid=grid, thinking=1.0)
    lo, hi = grid * 5 // 8, grid - 2
    for s in ds:
        assert verify(s, _reply(s)) == 1.0
        _check_image_task(s)  # answers still re-derived from the pixels
        for media in _media(s):
            w, h = media["image"].size
            assert w % grid == 0 and h % grid == 0 and 64 <= w <= 128 and 64 <= h <= 128
            for _, _, (x1, y1, x2, y2) in _blobs(media["image"]):
                assert x1 // grid == (x2 - 1) // grid and y1 // grid == (y2 - 1) // grid, (s["id"], x1, y1, x2, y2)
                assert max(x2 - x1, y2 - y1) <= hi and min(x2 - x1, y2 - y1) >= lo // 2  # triangles are short


def test_free_placement_bytes_are_unchanged_by_the_grid_option() -> None:
    # hashes taken with the code before the grid option existed (commit c888e8d)
    ds = SyntheticDataset(size=9, seed=4)
    assert content_hash(ds[2]) == "c899fc93996732fd8648eb309acabc1a"
    assert content_hash(ds[8]) == "94fd6a62849fc7031449fda087958616"


def test_grid_videos_keep_still_shapes_in_cells_and_answers_right() -> None:
    ds = SyntheticDataset(size=20, seed=6, tasks=["video_appear", "video_move"], image_size_range=(64, 96), grid=32)
    for s in ds:
        _check_video_task(s)
        (video,) = _media(s)
        assert all(f.size[0] % 32 == 0 and f.size[1] % 32 == 0 for f in video["video"])


def test_videos_have_the_right_frames() -> None:
    ds = SyntheticDataset(size=30, seed=3, tasks=["video_appear", "video_move"], video_frames=(3, 6), fps=4.0)
    lengths = set()
    for s in ds:
        (video,) = _media(s)
        frames = video["video"]
        lengths.add(len(frames))
        assert 3 <= len(frames) <= 6 and video["fps"] == 4.0
        assert len({f.size for f in frames}) == 1 and all(f.mode == "RGB" for f in frames)
        _check_video_task(s)
        assert all(round(t * 4.0) == t * 4.0 for _, t in s["answer"])  # a frame index / fps
    assert len(lengths) > 1


def test_thinking_fraction_and_access() -> None:
    assert all("reasoning" not in s for s in SyntheticDataset(size=20, thinking=0.0))
    assert all("reasoning" in s for s in SyntheticDataset(size=20, thinking=1.0))
    half = sum("reasoning" in s for s in SyntheticDataset(size=60, tasks=["text_math"], thinking=0.5))
    assert 15 < half < 45
    ds = SyntheticDataset(size=5)
    assert len(ds) == 5 and ds[-1]["id"] == ds[4]["id"] and len(list(ds)) == 5
    with pytest.raises(IndexError, match="index 5 out of range"):
        ds[5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "test"}, "split must be one of"),
        ({"tasks": ["count", "ocr"]}, r"unknown tasks \['ocr'\]"),
        ({"tasks": []}, "unknown tasks"),
        ({"image_size_range": (128, 64)}, r"got \(128, 64\)"),
        ({"image_size_range": (16, 64)}, "48 <= low"),
        ({"video_frames": (1, 4)}, r"got \(1, 4\)"),
        ({"fps": 0.0}, "fps must be > 0, got 0.0"),
        ({"thinking": 1.5}, r"got 1.5"),
        ({"size": -1}, "got -1"),
        ({"grid": 8}, "grid must be 0 .* or between 16 and the smallest image side 64, got 8"),
        ({"grid": 80, "image_size_range": (64, 128)}, "got 80"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticDataset(**kwargs)


def _one(task: str, **kwargs: Any) -> dict[str, Any]:
    return SyntheticDataset(size=1, seed=11, tasks=[task], **kwargs)[0]


def test_final_answer_extraction() -> None:
    assert final_answer("<think>3 or 4</think>\n\n4") == "4"
    assert final_answer("<think>unfinished 4") is None
    assert final_answer(r"so \boxed{7}.") == "7"
    assert final_answer(r"\boxed{[{'bbox_2d': [1, 2, 3, 4]}]} done") == "[{'bbox_2d': [1, 2, 3, 4]}]"
    assert final_answer("x <|begin_of_box|>yes<|end_of_box|> y") == "yes"


def test_verify_numbers_reject_hedging() -> None:
    s = {"answer": 3, "answer_type": "count"}
    assert verify(s, "3") == verify(s, "There are three stars.") == verify(s, r"\boxed{3}") == 1.0
    assert verify(s, "<think>1, 2, 5</think>3") == 1.0  # reasoning numbers are ignored
    for bad in ("4", "1 2 3 4 5 6 7 8", "3 or 4", "<think>3", "<think>3</think>4", "none"):
        assert verify(s, bad) == 0.0, bad
    assert verify({"answer": 33, "answer_type": "number"}, "19 + 14 = 33") == 0.0  # only the final number counts


def test_verify_choice_caption_boxes_timestamps() -> None:
    s = _one("colour")
    wrong = next(c for c in COLOURS if c != s["answer"])
    assert verify(s, f"It is {s['answer']}.") == 1.0
    assert verify(s, wrong) == 0.0 and verify(s, " ".join(COLOURS)) == 0.0
    yn = {"answer": "yes", "answer_type": "choice", "options": ["yes", "no"]}
    assert verify(yn, "Yes.") == 1.0 and verify(yn, "yes or no") == 0.0 and verify(yn, "no") == 0.0

    cap = {"answer": ["red circle", "red circle", "blue star"], "answer_type": "caption"}
    assert verify(cap, "a red circle, a blue star and a red circle") == 1.0
    assert verify(cap, "two red circles and one blue star") == 1.0
    assert verify(cap, "a red circle and a blue star") == 0.0
    every = ", ".join(f"a {c} {k}" for c in COLOURS for k in KINDS)
    assert verify(cap, every) == 0.0

    box = {"answer": [[100, 100, 300, 300]], "answer_type": "boxes"}
    assert verify(box, '[{"bbox_2d": [110, 95, 305, 310], "label": "red circle"}]') == 1.0
    assert verify(box, "[0, 0, 1000, 1000]") == 0.0  # IoU 0.04
    grid = [[x, y, x + 200, y + 200] for x in range(0, 1000, 100) for y in range(0, 1000, 100)]
    assert verify(box, str(grid)) <= 0.01  # spraying boxes earns (matches / boxes) only
    two = {"answer": [[0, 0, 100, 100], [500, 500, 600, 600]], "answer_type": "boxes"}
    assert verify(two, "[0, 0, 100, 100]") == 0.5

    ts = {"answer": [["red circle", 1.5], ["blue star", 3.0]], "answer_type": "timestamps"}
    assert verify(ts, "red circle at 1.5 seconds, blue star at 3.0 seconds") == 1.0
    assert verify(ts, "blue star at 3.4 s and red circle at 1.2 seconds") == 1.0
    assert verify(ts, "red circle at 2.5 seconds, blue star at 3.0 seconds") == 0.5
    assert verify(ts, "blue circle at 1.5 seconds, blue star at 3.0 seconds") == 0.5
    spray = ", ".join(f"red circle at {t / 2} seconds, blue star at {t / 2} seconds" for t in range(10))
    assert verify(ts, spray) <= 0.2
    one = {"answer": [["red circle", 1.5]], "answer_type": "timestamps"}
    assert verify(one, "It starts moving at 1.5 seconds.") == 1.0
    assert verify(one, "at 0.5 s, 1.0 s, 1.5 s, 2.0 s or 2.5 s") == 0.2
    with pytest.raises(ValueError, match="unknown answer_type 'ocr'"):
        verify({"answer": 1, "answer_type": "ocr"}, "1")


def test_generation_speed() -> None:
    ds = SyntheticDataset(size=200, seed=9)
    start = time.perf_counter()
    for s in ds:
        assert s["messages"]
    assert time.perf_counter() - start < 3.0
