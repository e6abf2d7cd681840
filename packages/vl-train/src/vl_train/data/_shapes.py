"""Scenes of coloured shapes for the synthetic dataset: placement without overlaps and crisp drawing.

Shapes are drawn with Pillow's ``ImageDraw`` (which never anti-aliases) in saturated named colours on a
grey, lightly noisy background, so every shape pixel has exactly its colour's RGB value and the ground
truth (counts, boxes, positions) can be re-derived from the pixels alone. Shapes are placed by rejection
sampling with a bounded number of tries; a shape that finds no free place is left out (fewer shapes).

Notation: ``W, H`` image width and height in pixels; a box ``(x1, y1, x2, y2)`` is in pixels with
exclusive ends; ``s`` the side of a shape's square frame; a label is ``"<colour> <kind>"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import PIL.ImageDraw

__all__ = [
    "COLOURS",
    "KINDS",
    "Scene",
    "Shape",
    "box_to_1000",
    "draw_scene",
    "place_box",
    "render_background",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 200, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
"""Colour name -> RGB. Far from every grey, so background noise can never take a shape's colour."""

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star")
"""Shape kinds, in the canonical order used by prompts."""

_GAP = 2  # pixels kept free between shapes so that two shapes never touch and boxes stay separable
_TRIES = 40


@dataclass(frozen=True)
class Shape:
    """One shape in its square frame ``[x, x + s) x [y, y + s)``.

    Attributes:
        kind: One of :data:`KINDS`.
        colour: One of :data:`COLOURS`' names.
        x: Left of the frame in pixels.
        y: Top of the frame in pixels.
        size: Side ``s`` of the frame in pixels.
    """

    kind: str
    colour: str
    x: int
    y: int
    size: int

    @property
    def label(self) -> str:
        """``"<colour> <kind>"``, e.g. ``"red circle"``."""
        return f"{self.colour} {self.kind}"

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the frame in pixels."""
        return (self.x + self.size / 2, self.y + self.size / 2)

    def moved(self, dx: int, dy: int) -> Shape:
        """The same shape shifted by ``(dx, dy)`` pixels."""
        return Shape(self.kind, self.colour, self.x + dx, self.y + dy, self.size)

    def mask(self) -> PIL.Image.Image:
        """The shape's pixels inside its frame as a mode ``"1"`` image of size ``s x s``."""
        return _mask(self.kind, self.size)

    def box(self) -> tuple[int, int, int, int]:
        """Tight pixel box ``(x1, y1, x2, y2)`` (exclusive ends) of the drawn pixels."""
        bx = self.mask().getbbox()
        assert bx is not None  # every kind draws at least one pixel for s >= 4
        return (self.x + bx[0], self.y + bx[1], self.x + bx[2], self.y + bx[3])


@dataclass
class Scene:
    """A canvas of ``W x H`` pixels with a grey background and shapes.

    Attributes:
        width: ``W``.
        height: ``H``.
        grey: Background grey level (0-255).
        noise: Amplitude of the uniform background noise in grey levels (0 = plain).
        noise_seed: Seed of the background noise, so that frames of a video share one background.
        shapes: The shapes, drawn in order.
        grid: Cell side in pixels (0: free placement). With a grid, ``W`` and ``H`` are multiples of it and
            every shape placed by :meth:`add` lies inside one cell.
    """

    width: int
    height: int
    grey: int
    noise: int
    noise_seed: int
    shapes: list[Shape] = field(default_factory=list)
    grid: int = 0

    @classmethod
    def random(cls, rng: np.random.Generator, size_range: tuple[int, int], grid: int = 0) -> Scene:
        """An empty scene of random size within ``size_range`` (each side drawn independently).

        With a ``grid``, each side is rounded down to a multiple of it (at least one cell).
        """
        lo, hi = size_range
        width, height = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        if grid:
            width, height = max(grid, width // grid * grid), max(grid, height // grid * grid)
        grey = int(rng.integers(20, 61)) if rng.random() < 0.5 else int(rng.integers(195, 241))
        noise = 0 if rng.random() < 0.3 else int(rng.integers(2, 9))
        return cls(width, height, grey, noise, int(rng.integers(2**31)), grid=grid)

    def size_bounds(self) -> tuple[int, int]:
        """Smallest and largest shape side: a share of the canvas, or of the cell with a grid."""
        if self.grid:  # large enough to show its kind, small enough to keep _GAP from a neighbour cell's shape
            return max(8, self.grid * 5 // 8), self.grid - _GAP
        short = min(self.width, self.height)
        return max(8, short // 8), max(10, short // 4)

    def random_size(self, rng: np.random.Generator) -> int:
        """A random shape side within :meth:`size_bounds`."""
        lo, hi = self.size_bounds()
        return int(rng.integers(lo, hi + 1))

    def add(self, rng: np.random.Generator, kind: str, colour: str, avoid: list[tuple[int, int, int, int]]) -> bool:
        """Place a shape of random size where it overlaps neither the shapes nor ``avoid``.

        Args:
            rng: Random generator.
            kind: Shape kind.
            colour: Colour name.
            avoid: Extra pixel boxes to keep free (e.g. the path of a moving shape).

        Returns:
            Whether a place was found within the bounded number of tries (if not, nothing is added).
        """
        taken = avoid + [(s.x, s.y, s.x + s.size, s.y + s.size) for s in self.shapes]
        size = self.random_size(rng)
        spot = place_box(rng, self.width, self.height, size, size, taken, grid=self.grid)
        if spot is None:
            return False
        self.shapes.append(Shape(kind, colour, spot[0], spot[1], size))
        return True

    def fill(self, rng: np.random.Generator, labels: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Place shapes with the given ``(kind, colour)`` labels; return those that found no place."""
        return [(kind, colour) for kind, colour in labels if not self.add(rng, kind, colour, [])]

    def background(self) -> PIL.Image.Image:
        """The background alone (deterministic from the scene's fields)."""
        return render_background(self.width, self.height, self.grey, self.noise, self.noise_seed)

    def render(self, base: PIL.Image.Image | None = None) -> PIL.Image.Image:
        """Draw the shapes on ``base`` (a copy; the background when None) and return the RGB image."""
        image = self.background() if base is None else base.copy()
        draw_scene(image, self.shapes)
        return image


def place_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    w: int,
    h: int,
    taken: list[tuple[int, int, int, int]],
    grid: int = 0,
) -> tuple[int, int] | None:
    """Top-left corner of a free ``w x h`` box inside the canvas, by bounded rejection sampling.

    Args:
        rng: Random generator.
        width: Canvas width ``W``.
        height: Canvas height ``H``.
        w: Box width.
        h: Box height.
        taken: Boxes ``(x1, y1, x2, y2)`` the new box must stay ``_GAP`` pixels away from.
        grid: Cell side (0: anywhere). A box that fits in a cell is put inside one random cell; a larger
            box is placed freely.

    Returns:
        ``(x, y)``, or None when the box does not fit or no free place was found.
    """
    if w > width or h > height:
        return None
    in_cell = grid > 0 and w <= grid and h <= grid
    for _ in range(_TRIES):
        if in_cell:
            x = int(rng.integers(0, width // grid)) * grid + int(rng.integers(0, grid - w + 1))
            y = int(rng.integers(0, height // grid)) * grid + int(rng.integers(0, grid - h + 1))
        else:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
        if all(
            x + w + _GAP <= a1 or a2 + _GAP <= x or y + h + _GAP <= b1 or b2 + _GAP <= y for a1, b1, a2, b2 in taken
        ):
            return x, y
    return None


def render_background(width: int, height: int, grey: int, noise: int, seed: int) -> PIL.Image.Image:
    """A grey ``W x H`` RGB image with uniform grey noise of amplitude ``noise`` (grey pixels stay grey)."""
    plane = np.full((height, width), grey, dtype=np.int16)
    if noise:
        plane += np.random.default_rng(seed).integers(-noise, noise + 1, size=(height, width), dtype=np.int16)
    grey_u8 = np.clip(plane, 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(np.repeat(grey_u8[:, :, None], 3, axis=2), "RGB")


_MASKS: dict[tuple[str, int], PIL.Image.Image] = {}


def _mask(kind: str, size: int) -> PIL.Image.Image:
    key = (kind, size)
    if key in _MASKS:  # a handful of (kind, size) pairs recur constantly: draw each once
        return _MASKS[key]
    mask = PIL.Image.new("1", (size, size), 0)
    draw = PIL.ImageDraw.Draw(mask)
    m = size - 1
    if kind == "circle":
        draw.ellipse((0, 0, m, m), fill=1)
    elif kind == "square":
        draw.rectangle((0, 0, m, m), fill=1)
    elif kind == "triangle":
        draw.polygon([(m / 2, 0), (m, m), (0, m)], fill=1)
    elif kind == "star":
        c, outer, inner = m / 2, m / 2, m / 5
        angles = np.pi / 2 + np.arange(10) * np.pi / 5  # points alternate outer / inner, tip upwards
        radii = np.where(np.arange(10) % 2 == 0, outer, inner)
        draw.polygon([(c + r * np.cos(a), c - r * np.sin(a)) for r, a in zip(radii, angles)], fill=1)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")
    _MASKS[key] = mask
    return mask


def draw_scene(image: PIL.Image.Image, shapes: list[Shape]) -> None:
    """Paint ``shapes`` onto ``image`` in place, each pixel in its colour's exact RGB value."""
    for s in shapes:
        image.paste(COLOURS[s.colour], (s.x, s.y, s.x + s.size, s.y + s.size), s.mask())


def box_to_1000(box: tuple[int, int, int, int], width: int, height: int) -> list[int]:
    """A pixel box in Qwen3-VL's grounding coordinates: each axis normalised to integers in 0-1000."""
    x1, y1, x2, y2 = box
    return [round(x1 * 1000 / width), round(y1 * 1000 / height), round(x2 * 1000 / width), round(y2 * 1000 / height)]
