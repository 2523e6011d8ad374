"""Reading a generated image back into words: which palette colour each pixel is, and where.

Used by the functional tests and by the training script's closing evaluation, so both judge the model the
same way. Thresholds live with the tests, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import COLOURS, KINDS, Scene, layout

NAMES = list(COLOURS)
_PALETTE = np.array([rgb for rgb, _ in COLOURS.values()], dtype=np.float32)
# Pixels farther than this (RGB distance) from every palette colour belong to none: a muddy mix of two
# colours must not count as either. Palette colours are at least ~80 apart (orange-yellow).
MAX_COLOUR_DISTANCE = 60.0
CORE_HALF_SIDE = 0.3  # of a shape's radius: this box lies inside every shape kind, wherever jitter puts it
BORDER_WIDTH = 0.04  # of the short side: training scenes never draw shapes there


def colour_map(image) -> np.ndarray:
    """(H, W) indices into NAMES of each pixel's nearest palette colour; -1 where none is near."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)
    nearest = distance.argmin(-1)
    return np.where(distance.min(-1) <= MAX_COLOUR_DISTANCE, nearest, -1)


def fraction(cmap: np.ndarray, colour: str) -> float:
    return float((cmap == NAMES.index(colour)).mean()) if cmap.size else 0.0


def border(cmap: np.ndarray) -> np.ndarray:
    h, w = cmap.shape
    band = max(1, round(BORDER_WIDTH * min(h, w)))
    return np.concatenate([cmap[:band].ravel(), cmap[-band:].ravel(), cmap[band:-band, :band].ravel(),
                           cmap[band:-band, -band:].ravel()])


def centroid(cmap: np.ndarray, colour: str) -> tuple[float, float] | None:
    """Mean (x, y) of the colour's pixels as fractions of width and height; None if absent."""
    ys, xs = np.nonzero(cmap == NAMES.index(colour))
    if len(xs) == 0:
        return None
    h, w = cmap.shape
    return float((xs.mean() + 0.5) / w), float((ys.mean() + 0.5) / h)


@dataclass(frozen=True)
class ShapeReading:
    colour: str
    core_fraction: float  # of the core box (inside the shape as placed nominally) in the shape's colour
    centroid_error: float  # max(|dx|, |dy|) between the colour's centroid and the named place (fractions)
    centroid: tuple[float, float] | None


@dataclass(frozen=True)
class Reading:
    background: str
    border_fraction: float  # of the border band in the background colour
    shapes: list[ShapeReading]

    def summary(self) -> str:
        parts = [f"border {self.border_fraction:.2f}"]
        parts += [f"{s.colour}: core {s.core_fraction:.2f} centroid±{s.centroid_error:.3f}" for s in self.shapes]
        return ", ".join(parts)


def read(image, scene: Scene) -> Reading:
    """How well `image` shows `scene`: the background on the border, each shape's colour at its place."""
    cmap = colour_map(image)
    h, w = cmap.shape
    shapes = []
    for shape, placed in zip(scene.shapes, layout(scene)):
        half = CORE_HALF_SIDE * placed.radius * min(w, h)
        x0, x1 = round(placed.cx * w - half), round(placed.cx * w + half)
        y0, y1 = round(placed.cy * h - half), round(placed.cy * h + half)
        core = fraction(cmap[y0:y1, x0:x1], shape.colour)
        where = centroid(cmap, shape.colour)
        error = 1.0 if where is None else max(abs(where[0] - placed.cx), abs(where[1] - placed.cy))
        shapes.append(ShapeReading(shape.colour, core, error, where))
    return Reading(scene.background, fraction(border(cmap), scene.background), shapes)


def agreement(image_a, image_b) -> float:
    """Fraction of pixels given the same palette colour (or none) in both images."""
    return float((colour_map(image_a) == colour_map(image_b)).mean())


@dataclass(frozen=True)
class OutlineReading:
    """How much a shape is drawn as an outline: its colour on a band just inside the edge (`band`) and in the
    middle (`middle`, which an outline leaves in the background colour: `middle_background`)."""

    colour: str
    band: float
    middle: float
    middle_background: float

    @property
    def score(self) -> float:
        """band - middle: about -0.1 for a filled shape, near 1 for a crisp outline."""
        return self.band - self.middle

    def summary(self) -> str:
        return (f"{self.colour}: band {self.band:.2f} middle {self.middle:.2f} (background there "
                f"{self.middle_background:.2f}) score {self.score:+.2f}")


def outline_read(image, scene: Scene, width: float) -> list[OutlineReading]:
    """Per shape of `scene` (nominal layout): fractions of the shape's colour on the band from 0.2 to 0.8 of
    `width` (a fraction of the radius) inside the edge, and in the middle, deeper than 1.5 * `width` inside."""
    import torch

    from .scenes import _signed_distance

    cmap = colour_map(image)
    h, w = cmap.shape
    short = min(w, h)
    ys = torch.arange(h, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, -1) + 0.5
    readings = []
    for shape, placed in zip(scene.shapes, layout(scene)):
        assert placed.kind in KINDS
        r = placed.radius * short
        d = _signed_distance(placed.kind, xs - placed.cx * w, ys - placed.cy * h, torch.tensor(r)).numpy()
        band = (d < -0.2 * width * r) & (d > -0.8 * width * r)
        middle = d < -1.5 * width * r
        colour, bg = NAMES.index(shape.colour), NAMES.index(scene.background)
        readings.append(OutlineReading(shape.colour, float((cmap[band] == colour).mean()) if band.any() else 0.0,
                                       float((cmap[middle] == colour).mean()) if middle.any() else 0.0,
                                       float((cmap[middle] == bg).mean()) if middle.any() else 0.0))
    return readings
