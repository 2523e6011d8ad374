"""The demo model's world: one or two flat shapes on a flat background, captioned in English and Chinese.

Everything here is deterministic: `sample_scene(rng)` draws a scene from a seeded `random.Random`, and
`layout` places it (nominal place and size, or jittered by the same rng) in fractions of the image, so
training can render at any size and the tests know where the prompt put each shape.

Some (shape, colour, background) combinations never appear in training (HELD_OUT); the functional tests
prompt for exactly those, so passing them needs composition, not memory.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# name: (RGB, Chinese). Saturated and far apart, so every pixel can be told by its nearest palette colour.
COLOURS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((220, 40, 40), "红色"),
    "green": ((40, 170, 70), "绿色"),
    "blue": ((40, 80, 220), "蓝色"),
    "yellow": ((240, 210, 40), "黄色"),
    "white": ((245, 245, 245), "白色"),
    "black": ((20, 20, 20), "黑色"),
    "orange": ((245, 130, 20), "橙色"),
    "purple": ((140, 50, 180), "紫色"),
}
SHAPES: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
KINDS = list(SHAPES)
# name: (centre x, centre y) as fractions of width and height.
POSITIONS: dict[str, tuple[float, float]] = {
    "centre": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
}
# name: (radius as a fraction of the short side, English word, Chinese word). Medium is the unmarked size.
SIZES: dict[str, tuple[float, str, str]] = {"small": (0.11, "small ", "小"), "medium": (0.17, "", ""),
                                           "large": (0.24, "large ", "大")}
_EN_POSITION = {"centre": "", "left": " on the left", "right": " on the right", "top": " at the top",
                "bottom": " at the bottom"}
_ZH_POSITION = {"centre": "上", "left": "左边", "right": "右边", "top": "上方", "bottom": "下方"}
_ZH_PAIR = {("left", "right"): ("左边", "右边"), ("top", "bottom"): ("上方", "下方")}
PAIRS = list(_ZH_PAIR)  # where two shapes go: side by side or stacked

# (shape, colour, background) never drawn in training. Each colour is held out once as a shape colour and
# once as a background, each shape twice.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset({
    ("circle", "yellow", "purple"), ("square", "green", "black"), ("triangle", "white", "blue"),
    ("star", "orange", "green"), ("circle", "purple", "white"), ("square", "red", "yellow"),
    ("triangle", "black", "orange"), ("star", "blue", "red"),
})

POSITION_JITTER = 0.03  # of the width/height: shapes are not pinned to five exact points
SIZE_JITTER = 0.1  # relative


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    position: str = "centre"
    size: str = "medium"


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def english(self, explicit_centre: bool = False) -> str:
        bg = f" on {_a(self.background)} background"
        if len(self.shapes) == 1:
            s = self.shapes[0]
            where = " in the centre" if s.position == "centre" and explicit_centre else _EN_POSITION[s.position]
            return f"{_a(SIZES[s.size][1] + s.colour)} {s.kind}{where}{bg}"
        a, b = self.shapes
        return (f"{_a(a.colour)} {a.kind}{_EN_POSITION[a.position]} and {_a(b.colour)} {b.kind}"
                f"{_EN_POSITION[b.position]}{bg}")

    def chinese(self, explicit_centre: bool = False) -> str:
        bg = COLOURS[self.background][1] + "背景"
        if len(self.shapes) == 1:
            s = self.shapes[0]
            where = "中间" if s.position == "centre" and explicit_centre else _ZH_POSITION[s.position]
            return f"{bg}{where}的{COLOURS[s.colour][1]}{SIZES[s.size][2]}{SHAPES[s.kind]}"
        a, b = self.shapes
        wa, wb = _ZH_PAIR[(a.position, b.position)]
        return f"{bg}上，{wa}是{COLOURS[a.colour][1]}{SHAPES[a.kind]}，{wb}是{COLOURS[b.colour][1]}{SHAPES[b.kind]}"

    def captions(self) -> list[str]:
        """Every caption training pairs with this scene (English and Chinese)."""
        both = [self.english(), self.chinese()]
        if len(self.shapes) == 1 and self.shapes[0].position == "centre":
            both += [self.english(explicit_centre=True), self.chinese(explicit_centre=True)]
        return both

    def is_held_out(self) -> bool:
        return any((s.kind, s.colour, self.background) in HELD_OUT for s in self.shapes)


def sample_scene(rng: random.Random, allow_held_out: bool = False) -> Scene:
    """A random scene: 70 % one shape (any place, any size), 30 % two shapes side by side or stacked."""
    names = list(COLOURS)
    while True:
        background = rng.choice(names)
        colours = [c for c in names if c != background]
        if rng.random() < 0.7:
            shapes = (Shape(rng.choice(list(SHAPES)), rng.choice(colours), rng.choice(list(POSITIONS)),
                            rng.choice(list(SIZES))),)
        else:
            first, second = rng.choice(PAIRS)
            c1, c2 = rng.sample(colours, 2)
            shapes = (Shape(rng.choice(list(SHAPES)), c1, first, rng.choice(["small", "medium"])),
                      Shape(rng.choice(list(SHAPES)), c2, second, rng.choice(["small", "medium"])))
        scene = Scene(background, shapes)
        if allow_held_out or not scene.is_held_out():
            return scene


@dataclass(frozen=True)
class Placed:
    """One shape placed in an image: centre (fractions of width, height) and radius (fraction of short side)."""

    kind: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    radius: float


def layout(scene: Scene, rng: random.Random | None = None) -> list[Placed]:
    """Where each shape goes: nominal without `rng`, jittered with it (training)."""
    placed = []
    for s in scene.shapes:
        (cx, cy), r = POSITIONS[s.position], SIZES[s.size][0]
        if rng is not None:
            cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
            cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
            r *= 1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        placed.append(Placed(s.kind, COLOURS[s.colour][0], cx, cy, r))
    return placed


# Shape geometry in units of the radius r, chosen so the four shapes have similar areas (~2.2-3.1 r²).
SQUARE_HALF_SIDE = 0.88
TRIANGLE_CIRCUMRADIUS = 1.3  # equilateral, pointing up, centroid at the centre
STAR_OUTER, STAR_INNER = 1.25, 0.625  # five points, one pointing up


def render(scenes: list[Scene], width: int, height: int, rng: random.Random | None = None, device="cpu",
           outline: float = 0.0):
    """Images of `scenes` as a float tensor (N, 3, height, width) in [-1, 1], edges anti-aliased over a pixel.

    `outline` > 0 draws each shape as its outline only: a band that wide (a fraction of the radius) inside the
    edge, the background showing through the middle (the demo LoRA's style).

    The whole batch is drawn with a fixed number of tensor operations, and its parameters travel to the
    device in one copy: on a GPU, per-shape host-to-device copies would stall training.
    """
    import torch

    short = min(width, height)
    slots = max(len(s.shapes) for s in scenes)
    rows = []  # per scene and slot: present, kind, cx, cy (pixels), radius (pixels), r, g, b
    for scene in scenes:
        placed = layout(scene, rng)
        rows += [[1.0, KINDS.index(p.kind), p.cx * width, p.cy * height, p.radius * short, *p.rgb] for p in placed]
        rows += [[0.0] * 8] * (slots - len(placed))
    params = torch.tensor(rows, dtype=torch.float32).view(len(scenes), slots, 8)
    background = torch.tensor([COLOURS[s.background][0] for s in scenes], dtype=torch.float32)
    params, background = params.to(device), background.to(device)

    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, -1, 1) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, -1) + 0.5
    image = background.view(-1, 3, 1, 1).expand(-1, 3, height, width)
    for slot in range(slots):
        present, kind, cx, cy, r, *_ = (params[:, slot, k].view(-1, 1, 1) for k in range(5))
        dx, dy = xs - cx, ys - cy
        distance = torch.full_like(dx * dy, 1e9)
        for index, name in enumerate(KINDS):
            distance = torch.where(kind == index, _signed_distance(name, dx, dy, r), distance)
        if outline:
            distance = (distance + outline * r / 2).abs() - outline * r / 2
        coverage = ((0.5 - distance).clamp(0, 1) * present).unsqueeze(1)
        image = image + (params[:, slot, 5:8].view(-1, 3, 1, 1) - image) * coverage
    return image / 127.5 - 1


def _signed_distance(kind: str, dx, dy, r):
    """Approximate signed distance in pixels to the shape's edge (negative inside); r is the radius."""
    import torch

    if kind == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    if kind == "square":
        return torch.maximum(dx.abs(), dy.abs()) - SQUARE_HALF_SIDE * r
    if kind == "triangle":
        # Distance to the three edges' lines; their outward normals point down, up-right and up-left.
        edges = [dy, 0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy]
        return torch.maximum(torch.maximum(edges[0], edges[1]), edges[2]) - TRIANGLE_CIRCUMRADIUS * r / 2
    if kind == "star":
        outer, inner = STAR_OUTER * r, STAR_INNER * r
        rho = torch.sqrt(dx * dx + dy * dy)
        angle = torch.atan2(dx, -dy)  # 0 pointing up
        seg = math.pi / 5
        alpha = (torch.remainder(angle + seg, 2 * seg) - seg).abs()  # 0 at a point, seg at a notch
        edge = outer * inner * math.sin(seg) / (outer * torch.sin(alpha) + inner * torch.sin(seg - alpha))
        return rho - edge
    raise ValueError(f"unknown shape {kind!r}")


def held_out_scenes() -> list[Scene]:
    """One test scene per held-out combination, cycling through the five positions."""
    places = list(POSITIONS)
    return [Scene(bg, (Shape(kind, colour, places[i % len(places)]),))
            for i, (kind, colour, bg) in enumerate(sorted(HELD_OUT))]


def every_caption() -> list[str]:
    """Every caption training can draw (jitter and the unnamed sizes of two-shape scenes aside)."""
    captions = set()
    for bg in COLOURS:
        others = [c for c in COLOURS if c != bg]
        for kind in SHAPES:
            for colour in others:
                for position in POSITIONS:
                    for size in SIZES:
                        captions.update(_trained_captions(Scene(bg, (Shape(kind, colour, position, size),))))
                for first, second in PAIRS:
                    for kind2 in SHAPES:
                        for colour2 in others:
                            if colour2 != colour:
                                captions.update(_trained_captions(
                                    Scene(bg, (Shape(kind, colour, first), Shape(kind2, colour2, second)))))
    return sorted(captions)


def _trained_captions(scene: Scene) -> list[str]:
    return [] if scene.is_held_out() else scene.captions()


def corpus() -> list[str]:
    """Captions covering the whole vocabulary (the tokenizer learns its merges from them)."""
    rng = random.Random(0)
    texts = []
    for _ in range(400):
        texts += sample_scene(rng, allow_held_out=True).captions()
    return texts


EXAMPLE_SCENES = [
    Scene("blue", (Shape("circle", "red"),)),
    Scene("white", (Shape("star", "black", "left", "large"),)),
    Scene("black", (Shape("triangle", "yellow", "right"),)),
    Scene("yellow", (Shape("circle", "red", "left"), Shape("square", "blue", "right"))),
    Scene("purple", (Shape("square", "green", "top", "small"),)),
    Scene("green", (Shape("star", "orange", "bottom"),)),
]
# Prompts the web app offers for the tiny model: each scene in English, then in Chinese.
EXAMPLE_PROMPTS: list[str] = [s.english() for s in EXAMPLE_SCENES] + [s.chinese() for s in EXAMPLE_SCENES]
