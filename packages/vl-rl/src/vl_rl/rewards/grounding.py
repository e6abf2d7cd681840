"""Grounding verifier: IoU of predicted vs reference boxes (REFERENCE.md section 5, GLM-4.5V / Qwen3-VL).

Boxes are ``[x1, y1, x2, y2]`` in Qwen3-VL's relative 0-1000 coordinates (any consistent system
works; ``coord_max`` only bounds what is accepted). Parsed formats: Qwen3-VL JSON
``[{"bbox_2d": [...], "label": "cat"}]`` (also inside a ```json fence), a list of boxes
``[[...], [...]]``, or a single box ``[x1, y1, x2, y2]``.

Matching is one-to-one and greedy by IoU (each reference box is matched by at most one prediction).
Reward (``mode="share"``): matched boxes with IoU >= ``threshold`` divided by
``max(#pred, #ref)``, so spraying extra boxes lowers the score instead of raising it; a box over
the whole image has a small IoU with a small object. ``mode="iou"`` uses the sum of matched IoUs in
the numerator. Unparsable output, more than ``max_boxes`` predictions, or malformed boxes
(x2 <= x1, NaN, outside ``[0, coord_max]``) give 0; a coordinate beyond float range (a 400-digit
integer) is malformed too (reason ``"number_out_of_range"``, see ``collect_reasons``), not an
``OverflowError``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vl_rl.rewards._reasons import zero
from vl_rl.rewards.extract import answer_text

__all__ = ["Box", "box_iou", "grounding_reward", "grounding_score", "parse_boxes"]

Box = tuple[float, float, float, float]
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (0 when the union is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _as_box(value: Any, coord_max: float) -> Box | None:
    if not isinstance(value, list | tuple) or len(value) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in value)
    except OverflowError:  # an int beyond float range
        zero("number_out_of_range")
        return None
    if not all(math.isfinite(v) and 0.0 <= v <= coord_max for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        return None
    return (x1, y1, x2, y2)


def parse_boxes(text: str, *, coord_max: float = 1000.0) -> list[tuple[Box, str | None]] | None:
    """Boxes (with labels when given) from a response's answer text, or ``None`` when unparsable.

    A malformed box anywhere makes the whole answer unparsable (no partial credit for junk).
    """
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    start = min((i for i in (body.find("["), body.find("{")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(body[start:])
    except (ValueError, RecursionError):  # deeply nested brackets exhaust the JSON decoder's stack
        return None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        return None
    if all(isinstance(v, int | float) for v in data):
        data = [data]
    out: list[tuple[Box, str | None]] = []
    for item in data:
        label = None
        if isinstance(item, dict):
            label = str(item["label"]) if "label" in item else None
            item = item.get("bbox_2d", item.get("bbox"))
        box = _as_box(item, coord_max)
        if box is None:
            return None
        out.append((box, label))
    return out


def grounding_score(
    pred: Sequence[tuple[Box, str | None]],
    ref: Sequence[tuple[Box, str | None]],
    *,
    threshold: float = 0.5,
    mode: str = "share",
    match_labels: bool = False,
) -> float:
    """Greedy one-to-one IoU matching score in [0, 1] (see the module docstring)."""
    if mode not in ("share", "iou"):
        raise ValueError(f"mode must be 'share' or 'iou', got {mode!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if not ref:
        return float(not pred)
    pairs = []
    for i, (pbox, plabel) in enumerate(pred):
        for j, (rbox, rlabel) in enumerate(ref):
            if match_labels and rlabel is not None and (plabel or "").strip().lower() != rlabel.strip().lower():
                continue
            iou = box_iou(pbox, rbox)
            if iou >= threshold and iou > 0:
                pairs.append((iou, i, j))
    pairs.sort(reverse=True)
    used_p: set[int] = set()
    used_r: set[int] = set()
    total = 0.0
    for iou, i, j in pairs:
        if i in used_p or j in used_r:
            continue
        used_p.add(i)
        used_r.add(j)
        total += iou if mode == "iou" else 1.0
    return total / max(len(pred), len(ref))


def grounding_reward(
    prompt: str,
    response: str,
    sample: Mapping[str, Any],
    *,
    threshold: float = 0.5,
    mode: str = "share",
    match_labels: bool = False,
    max_boxes: int = 100,
    coord_max: float = 1000.0,
) -> float:
    """Grounding reward against ``sample["answer"]`` (boxes as a list, a box, or Qwen3-VL JSON).

    The prediction is read from the boxed/tagged answer, else from the answer region.
    """
    del prompt
    if "answer" not in sample:
        raise ValueError(f"grounding_reward needs sample['answer']; sample keys are {sorted(sample)}")
    ref_raw = sample["answer"]
    ref = parse_boxes(ref_raw if isinstance(ref_raw, str) else json.dumps(ref_raw), coord_max=coord_max)
    if ref is None:
        raise ValueError(f"sample['answer'] is not a valid box list: {ref_raw!r}")
    text = answer_text(response)
    if text is None:
        return 0.0
    pred = parse_boxes(text, coord_max=coord_max)
    if pred is None or len(pred) > max_boxes:
        return 0.0
    return grounding_score(pred, ref, threshold=threshold, mode=mode, match_labels=match_labels)
