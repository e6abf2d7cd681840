"""Task generators of the synthetic dataset: one small function per task, each with a verifiable answer.

Every generator takes a random generator and the dataset's :class:`TaskContext` and returns a
:class:`TaskOutput`: the user's content items, the machine-checkable answer, its rendering as the
assistant's text and a short step-by-step ``reasoning`` for the thinking format. A generator that draws a
degenerate case (e.g. two images with the same count) raises :class:`Retry`; the dataset then draws again.

Notation: a label is ``"<colour> <kind>"``; boxes are ``[x1, y1, x2, y2]`` in Qwen3-VL's 0-1000 grounding
coordinates; ``k`` a frame index, ``fps`` frames per second, ``t = k / fps`` seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ._shapes import COLOURS, KINDS, Scene, Shape, box_to_1000, place_box

__all__ = ["TASKS", "Retry", "TaskContext", "TaskOutput"]

_COLOURS = tuple(COLOURS)


class Retry(Exception):
    """The draw was degenerate; draw again with a fresh random stream."""


@dataclass(frozen=True)
class TaskContext:
    """What every generator needs from the dataset's settings.

    Attributes:
        size_range: Smallest and largest image side in pixels.
        video_frames: Smallest and largest number of video frames.
        fps: Video frames per second.
        grid: Cell side of the scenes in pixels (0: free placement; see ``Scene``).
    """

    size_range: tuple[int, int]
    video_frames: tuple[int, int]
    fps: float
    grid: int = 0


@dataclass
class TaskOutput:
    """One generated question with its answer.

    Attributes:
        content: The user's content items (images, videos, then the question text).
        answer: The machine-checkable answer (see the ``answer_type`` table of ``synthetic``).
        answer_text: The answer as the assistant writes it.
        answer_type: How :func:`vl_train.data.synthetic.verify` checks a response.
        reasoning: A short step-by-step derivation of the answer.
        options: The allowed answers of a ``"choice"`` question, else None.
    """

    content: list[dict[str, Any]]
    answer: Any
    answer_text: str
    answer_type: str
    reasoning: str
    options: list[str] | None = None


def _pick(rng: np.random.Generator, items: tuple[str, ...] | list[str]) -> str:
    return str(items[int(rng.integers(len(items)))])


def _label(rng: np.random.Generator, kinds: tuple[str, ...] = KINDS) -> tuple[str, str]:
    return _pick(rng, kinds), _pick(rng, _COLOURS)


def _ordered(shapes: list[Shape]) -> list[Shape]:
    """Left to right (ties: top to bottom): the canonical order of captions and answers."""
    return sorted(shapes, key=lambda s: (s.center[0], s.center[1]))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _listing(labels: list[str]) -> str:
    items = [f"a {label}" for label in labels]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _center_1000(scene: Scene, s: Shape) -> tuple[int, int]:
    return round(s.center[0] * 1000 / scene.width), round(s.center[1] * 1000 / scene.height)


def _image(scene: Scene) -> dict[str, Any]:
    return {"type": "image", "image": scene.render()}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def caption(rng: np.random.Generator, ctx: TaskContext) -> TaskOutput:
    """Describe the image: every shape, left to right, in a canonical sentence."""
    scene = Scene.random(rng, ctx.size_range, ctx.grid)
    scene.fill(rng, [_label(rng) for _ in range(int(rng.integers(1, 6)))])
    labels = [s.label for s in _ordered(scene.shapes)]
    text = f"{_plural(len(labels), 'shape')}, from left to right: {_listing(labels)}."
    reasoning = f"I scan the image from left to right and see {_listing(labels)}. That is {len(labels)} in all."
    prompt = "Describe the image: list every shape with its colour, from left to right."
    return TaskOutput([_image(scene), _text(prompt)], labels, text, "caption", reasoning)


def count(rng: np.random.Generator, ctx: TaskContext) -> TaskOutput:
    """How many shapes of a kind, or of a colour, the image holds (possibly none)."""
    scene = Scene.random(rng, ctx.size_range, ctx.grid)
    scene.fill(rng, [_label(rng) for _ in range(int(rng.integers(1, 9)))])
    present = scene.shapes[int(rng.integers(len(scene.shapes)))]
    by_kind = rng.random() < 0.5
    if by_kind:
        kind = present.kind if rng.random() < 0.8 else _pick(rng, KINDS)
        hits = [s for s in _ordered(scene.shapes) if s.kind == kind]
        question, what = f"How many {kind}s are there in the image?", f"{kind}s"
    else:
        colour = present.colour if rng.random() < 0.8 else _pick(rng, _COLOURS)
        hits = [s for s in _ordered(scene.shapes) if s.colour == colour]
        question, what = f"How many {colour} shapes are there in the image?", f"{colour} shapes"
    seen = ", ".join(s.label for s in _ordered(scene.shapes))
    found = ", ".join(s.label for s in hits) if hits else "none"
    reasoning = f"The shapes from left to right: {seen}. The {what} among them: {found}. So the count is {len(hits)}."
    prompt = f"{question} Answer with a number."
    return TaskOutput([_image(scene), _text(prompt)], len(hits), str(len(hits)), "count", reasoning)


def colour(rng: np.random.Generator, ctx: TaskContext) -> TaskOutput:
    """The colour of the only shape of a kind."""
    scene = Scene.random(rng, ctx.size_range, ctx.grid)
    kind, col = _label(rng)
    others = tuple(k for k in KINDS if k != kind)
    scene.fill(rng, [(kind, col)] + [_label(rng, others) for _ in range(int(rng.integers(0, 5)))])
    reasoning = f"There is exactly one {kind} in the image, and its pixels are {col}."
    prompt = f"What colour is the {kind}? Answer with one word."
    return TaskOutput([_image(scene), _text(prompt)], col, col, "choice", reasoning, list(_COLOURS))


_RELATIONS = {"x": ("to the left of", "to the right of"), "y": ("above", "below")}


def spatial(rng: np.random.Generator, ctx: TaskContext) -> TaskOutput:
    """Is shape A left of / right of / above / below shape B: yes or no (never ambiguous)."""
    scene = Scene.random(rng, ctx.size_range, ctx.grid)
    a, b = _label(rng), _label(rng)
    if a == b:
        raise Retry
    distractors = [lab for lab in (_label(rng) for _ in range(int(rng.integers(0, 3)))) if lab not in (a, b)]
    if scene.fill(rng, [a, b]):
        raise Retry
    scene.fill(rng, distractors)
    sa, sb = scene.shapes[0], scene.shapes[1]
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = sa.box(), sb.box()
    # only an axis on which the two boxes do not overlap gives an answer nobody can dispute
    axes = [ax for ax, sep in (("x", ax2 <= bx1 or bx2 <= ax1), ("y", ay2 <= by1 or by2 <= ay1)) if sep]
    axis = _pick(rng, axes)
    first = rng.random() < 0.5
    relation = _RELATIONS[axis][0 if first else 1]
    a_before = ax2 <= bx1 if axis == "x" else ay2 <= by1  # A left of / above B
    answer = "yes" if a_before == first else "no"
    (cax, cay), (cbx, cby) = _center_1000(scene, sa), _center_1000(scene, sb)
    coord = "x" if axis == "x" else "y"
    reasoning = (
        f"In 0-1000 coordinates the {sa.label} is centred at ({cax}, {cay}) and the {sb.label} at ({cbx}, {cby}). "
        f"Comparing {coord}: the {sa.label} is {_RELATIONS[axis][0 if a_before else 1]} the {sb.label}, so: {answer}."
    )
    prompt = f"Is the {sa.label} {relation} the {sb.label}? Answer yes or no."
    return TaskOutput([_image(scene), _text(prompt)], answer, answer, "choice", reasoning, ["yes", "no"])


def grounding(rng: np.random.Generator, ctx: TaskContext) -> TaskOutput:
    """Boxes in 0-1000 coordinates of one labelled shape, or of every shape of a kind (JSON answer)."""
    scene = Scene.random(rng, ctx.size_range, ctx.grid)
    if rng.random() < 0.5:
        target = _label(rng)
        others = [lab for lab in (_label(rng) for _ in range(int(rng.integers(0, 5)))) if lab != target]
        if scene.fill(rng, [target]):
            raise Retry
        scene.fill(rng, others)
        hits, what = [scene.shapes[0]], f"the {target[1]} {target[0]}"
    else:
        kind = _pick(rng, KINDS)
        rest = tuple(k for k in KINDS if k != kind)
        scene.fill(rng, [(kind, _pick(rng, _COLOURS)) for _ in range(int(rng.integers(1, 4)))])
        scene.fill(rng, [_label(rng, rest) for _ in range(int(rng.integers(0, 4)))])
        hits, what = _ordered([s for s in scene.shapes if s.kind == kind]), f"every {kind}"
    boxes = [box_to_1000(s.box(), scene.width, scene.height) for s in hits]
    text = json.dumps([{"bbox_2d": bx, "label": s.label} for bx, s in zip(boxes, hits)])
    steps = "; ".join(f"the {s.label} spans {bx}" for s, bx in zip(hits, boxes))
    reasoning = f"I look for {what}. In 0-1000 coordinates {steps}."
    prompt = (
        f"Locate {what} in the image. Output the bounding boxes in JSON format, "
        '[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}], with coordinates from 0 to 1000.'
    )
    return TaskOutput([_image(scene), _text(prompt)], boxes, text, "boxes", reasoning)


def compare(rng: np.random.Generator, ctx: TaskContext) -> TaskOutput:
    """Two images: which has more shapes (or more shapes of one colour), the first or the second."""
    scenes = [Scene.random(rng, ctx.size_range, ctx.grid) for _ in range(2)]
    for scene in scenes:
        scene.fill(rng, [_label(rng) for _ in range(int(rng.integers(1, 7)))])
    if rng.random() < 0.6:
        counts, what = [len(s.shapes) for s in scenes], "shapes"
    else:
        col = scenes[int(rng.integers(2))].shapes[0].colour
        counts, what = [sum(sh.colour == col for sh in s.shapes) for s in scenes], f"{col} shapes"
    if counts[0] == counts[1]:
        raise Retry
    answer = "first" if counts[0] > counts[1] else "second"
    reasoning = f"The first image has {counts[0]} {what} and the second has {counts[1]}, so the {answer} has more."
    prompt = f"Which image contains more {what}, the first or the second?"
    content = [_image(scenes[0]), _image(scenes[1]), _text(prompt)]
    return TaskOutput(content, answer, f"The {answer} image.", "choice", reasoning, ["first", "second"])


def _video_scene(rng: np.random.Generator, ctx: TaskContext) -> tuple[Scene, int]:
    lo, hi = ctx.video_frames
    return Scene.random(rng, ctx.size_range, ctx.grid), int(rng.integers(lo, hi + 1))


def _timestamp_text(pairs: list[list[Any]]) -> str:
    return ", ".join(f"{label} at {t:.1f} seconds" for label, t in pairs)


def video_appear(rng: np.random.Generator, ctx: TaskContext) -> TaskOutput:
    """A short video in which one or two shapes appear; answer when each appears (in seconds)."""
    scene, n = _video_scene(rng, ctx)
    n_new = 1 if n < 3 or rng.random() < 0.5 else 2
    labels = list(dict.fromkeys(_label(rng) for _ in range(n_new + int(rng.integers(0, 3)))))
    if len(labels) < n_new or scene.fill(rng, labels[:n_new]):
        raise Retry
    scene.fill(rng, labels[n_new:])
    new, static = scene.shapes[:n_new], scene.shapes[n_new:]
    starts = sorted(int(k) for k in rng.choice(np.arange(1, n), size=n_new, replace=False))
    base = replace(scene, shapes=static).render()
    frames = [replace(scene, shapes=[s for s, k in zip(new, starts) if k <= f]).render(base) for f in range(n)]
    pairs = [[s.label, k / ctx.fps] for s, k in zip(new, starts)]
    steps = "; ".join(
        f"the {s.label} is first visible in frame {k}, at {k}/{ctx.fps:g} = {k / ctx.fps:.1f} s"
        for s, k in zip(new, starts)
    )
    reasoning = f"The video has {n} frames at {ctx.fps:g} fps. Frame 0 shows {len(static)} shapes; {steps}."
    prompt = "Which shapes appear during the video, and when? Answer like '<colour> <shape> at <t> seconds' for each."
    content = [{"type": "video", "video": frames, "fps": float(ctx.fps)}, _text(prompt)]
    return TaskOutput(content, pairs, _timestamp_text(pairs), "timestamps", reasoning)


def video_move(rng: np.random.Generator, ctx: TaskContext) -> TaskOutput:
    """A short video in which one shape stands still, then moves; answer when it starts moving."""
    scene, n = _video_scene(rng, ctx)
    k = int(rng.integers(1, n))  # first frame that differs from the one before
    size = scene.random_size(rng)
    steps_n = n - k
    step = int(rng.integers(max(2, size // 4), max(3, size // 2) + 1))
    step = min(step, (min(scene.width, scene.height) - size) // steps_n)  # keep the path on the canvas
    if step < 2:
        raise Retry
    dx, dy = ((step, 0), (-step, 0), (0, step), (0, -step), (step, step), (-step, -step))[int(rng.integers(6))]
    # the whole path is one box so that no other shape ever overlaps the moving one
    w, h = size + abs(dx) * steps_n, size + abs(dy) * steps_n
    spot = place_box(rng, scene.width, scene.height, w, h, [])
    if spot is None:
        raise Retry
    x0 = spot[0] + (abs(dx) * steps_n if dx < 0 else 0)
    y0 = spot[1] + (abs(dy) * steps_n if dy < 0 else 0)
    mover = Shape(*_label(rng), x0, y0, size)
    for lab in (_label(rng) for _ in range(int(rng.integers(0, 3)))):
        if lab != (mover.kind, mover.colour):  # a twin would make "the <label>" ambiguous
            scene.add(rng, *lab, avoid=[(spot[0], spot[1], spot[0] + w, spot[1] + h)])
    base = scene.render()
    shifts = [max(0, f - k + 1) for f in range(n)]
    frames = [replace(scene, shapes=[mover.moved(dx * m, dy * m)]).render(base) for m in shifts]
    pairs = [[mover.label, k / ctx.fps]]
    reasoning = (
        f"The video has {n} frames at {ctx.fps:g} fps. The {mover.label} is still up to frame {k - 1} and has moved "
        f"in frame {k}, so it starts moving at {k}/{ctx.fps:g} = {k / ctx.fps:.1f} seconds."
    )
    prompt = f"When does the {mover.label} start moving? Answer like '<colour> <shape> at <t> seconds'."
    content = [{"type": "video", "video": frames, "fps": float(ctx.fps)}, _text(prompt)]
    return TaskOutput(content, pairs, _timestamp_text(pairs), "timestamps", reasoning)


_NAMES = ("Ada", "Ben", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ines", "Jon")


def text_math(rng: np.random.Generator, ctx: TaskContext) -> TaskOutput:
    """A text-only arithmetic word problem about shapes with an integer answer."""
    name, kind, col = _pick(rng, _NAMES), _pick(rng, KINDS), _pick(rng, _COLOURS)
    a, b, c = (int(v) for v in rng.integers(2, 40, size=3))
    form = int(rng.integers(4))
    if form == 0:
        answer = a + b
        q = f"{name} draws {a} {col} {kind}s and then {b} more. How many {col} {kind}s are there now?"
        steps = f"{a} + {b} = {answer}."
    elif form == 1:
        a, b = max(a, b), min(a, b)
        answer = a - b
        q = f"{name} has {a} {kind}s and erases {b} of them. How many {kind}s are left?"
        steps = f"{a} - {b} = {answer}."
    elif form == 2:
        a, b = a % 9 + 2, b % 9 + 2
        answer = a * b
        q = f"{name} draws {a} rows of {kind}s with {b} {kind}s in each row. How many {kind}s are there?"
        steps = f"{a} × {b} = {answer}."
    else:
        c = min(c, a + b)
        answer = a + b - c
        q = f"{name} draws {a} {kind}s and {b} more, then erases {c}. How many {kind}s remain?"
        steps = f"{a} + {b} = {a + b}, and {a + b} - {c} = {answer}."
    return TaskOutput([_text(f"{q} Answer with a number.")], answer, str(answer), "number", steps)


TASKS: dict[str, Callable[[np.random.Generator, TaskContext], TaskOutput]] = {
    "caption": caption,
    "count": count,
    "colour": colour,
    "spatial": spatial,
    "grounding": grounding,
    "compare": compare,
    "video_appear": video_appear,
    "video_move": video_move,
    "text_math": text_math,
}
"""Task name -> generator, in the order the dataset cycles through them."""
