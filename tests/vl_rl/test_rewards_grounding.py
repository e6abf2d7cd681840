"""Grounding verifier: IoU against a rasterised reference, parsing, matching, hacking attempts."""

from __future__ import annotations

import json
import random

import pytest

from vl_rl.rewards.grounding import box_iou, grounding_reward, grounding_score, parse_boxes

REF = {"answer": [[100, 100, 200, 200], [600, 600, 700, 800]]}


def _raster_iou(a: list[int], b: list[int]) -> float:
    cells_a = {(x, y) for x in range(a[0], a[2]) for y in range(a[1], a[3])}
    cells_b = {(x, y) for x in range(b[0], b[2]) for y in range(b[1], b[3])}
    return len(cells_a & cells_b) / len(cells_a | cells_b)


def test_iou_against_rasterised_reference() -> None:
    rng = random.Random(0)
    for _ in range(100):
        boxes = []
        for _ in range(2):
            x1, y1 = rng.randint(0, 20), rng.randint(0, 20)
            boxes.append([x1, y1, x1 + rng.randint(1, 15), y1 + rng.randint(1, 15)])
        assert box_iou(boxes[0], boxes[1]) == pytest.approx(_raster_iou(boxes[0], boxes[1]))


def test_parse_formats() -> None:
    qwen = json.dumps([{"bbox_2d": [1, 2, 3, 4], "label": "cat"}])
    assert parse_boxes(qwen) == [((1.0, 2.0, 3.0, 4.0), "cat")]
    assert parse_boxes(f"Here:\n```json\n{qwen}\n```") == [((1.0, 2.0, 3.0, 4.0), "cat")]
    assert parse_boxes("[[1,2,3,4],[5,6,7,8]]") == [((1.0, 2.0, 3.0, 4.0), None), ((5.0, 6.0, 7.0, 8.0), None)]
    assert parse_boxes("box: [1, 2, 3, 4]") == [((1.0, 2.0, 3.0, 4.0), None)]
    assert parse_boxes('{"bbox_2d": [1, 2, 3, 4]}') == [((1.0, 2.0, 3.0, 4.0), None)]


@pytest.mark.parametrize(
    "text",
    [
        "no boxes",
        "[]",
        "[1,2,3]",
        "[3,2,1,4]",
        "[1,2,3,1001]",
        "[[1,2,3,4],[1,2]]",
        '[{"label": "x"}]',
        "[1,2,3,true]",
        "[1, 2, 3, NaN]",
    ],
)
def test_parse_refuses(text: str) -> None:
    assert parse_boxes(text) is None


def test_grounding_reward_basic() -> None:
    exact = json.dumps([{"bbox_2d": b} for b in REF["answer"]])
    assert grounding_reward("", exact, REF) == 1.0
    assert grounding_reward("", f"<answer>{exact}</answer>", REF) == 1.0
    assert grounding_reward("", "[[100,100,200,200]]", REF) == 0.5
    assert grounding_reward("", "[[100,100,200,200]]", REF, mode="iou") == 0.5
    assert grounding_reward("", "[[100,100,200,190]]", REF, mode="iou") == pytest.approx(0.45)


def test_grounding_hacks() -> None:
    assert grounding_reward("", "[[0,0,1000,1000]]", REF) == 0.0  # box over the whole image
    assert grounding_reward("", "[[0,0,1000,1000],[0,0,1000,1000]]", REF) == 0.0
    grid = [
        [x, y, x + 100, y + 100]
        for x in range(0, 1000, 50)
        for y in range(0, 1000, 50)
        if x + 100 <= 1000 and y + 100 <= 1000
    ]
    assert grounding_reward("", json.dumps(grid), REF) <= 2 / len(grid)  # spraying boxes
    assert grounding_reward("", json.dumps(grid * 3), REF) == 0.0  # over max_boxes
    # the same box twice cannot match two references
    assert grounding_reward("", "[[100,100,200,200],[100,100,200,200]]", REF) == 0.5
    assert grounding_reward("", "<think>[[100,100,200,200]]</think> none", REF) == 0.0
    assert grounding_reward("", "<think>[[100,100,200,200]]", REF) == 0.0
    assert grounding_reward("", "", REF) == 0.0
    assert grounding_reward("", r"\boxed{[[1,1,2,2]]} \boxed{[[100,100,200,200]]}", REF) == 0.0


def test_labels_and_validation() -> None:
    ref = [((0.0, 0.0, 10.0, 10.0), "cat")]
    assert grounding_score([((0.0, 0.0, 10.0, 10.0), "dog")], ref) == 1.0
    assert grounding_score([((0.0, 0.0, 10.0, 10.0), "dog")], ref, match_labels=True) == 0.0
    assert grounding_score([((0.0, 0.0, 10.0, 10.0), "Cat")], ref, match_labels=True) == 1.0
    assert grounding_score([], []) == 1.0
    assert grounding_score([((0.0, 0.0, 1.0, 1.0), None)], []) == 0.0
    with pytest.raises(ValueError, match="threshold"):
        grounding_score([], ref, threshold=2.0)
    with pytest.raises(ValueError, match="mode"):
        grounding_score([], ref, mode="f1")
    with pytest.raises(ValueError, match="not a valid box"):
        grounding_reward("", "[1,2,3,4]", {"answer": "nothing"})
