"""Quality tiers and aspect ratios, as data.

A preset is (tier, aspect). The tier fixes the pixel area, the number of denoising steps (transformer
forwards: diffusers >= 0.39 runs exactly `steps` forwards) and whether the VAE decodes in tiles; the aspect
ratio shapes that area. Sizes are multiples of 16 (VAE /8 x transformer patch 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

SIZE_MULTIPLE = 16
# Custom sizes accepted from callers. Presets may go past MAX_SIDE on the long edge of wide aspects
# (Ultra 21:9 is 2352 wide): keeping their area is what the tier promises.
MIN_SIDE, MAX_SIDE = 256, 2048
MIN_STEPS, MAX_STEPS = 1, 16
AREA_TOLERANCE = 0.06  # every preset size lies within 6 % of its tier's area
GUIDANCE_SCALE = 0.0  # Turbo is distilled without CFG; > 0 would double every forward


@dataclass(frozen=True)
class Tier:
    name: str
    side: int  # the tier's area is side x side
    steps: int
    vae_tiling: bool  # decoded in tiles under every memory profile (memory.profile_spec adds tiers per profile)
    description: str

    @property
    def area(self) -> int:
        return self.side * self.side


TIERS: dict[str, Tier] = {
    t.name: t
    for t in (
        Tier("Draft", 768, 6, False, "fast preview, ~0.6 MP"),
        Tier("Standard", 1024, 8, False, "the model's native 1 MP"),
        Tier("High", 1280, 8, False, "~1.6 MP"),
        Tier("Ultra", 1536, 8, True, "~2.4 MP, tiled VAE decode"),
    )
}
DEFAULT_TIER = "Standard"

ASPECTS: dict[str, tuple[int, int]] = {
    "1:1": (1, 1),
    "4:3": (4, 3),
    "3:4": (3, 4),
    "3:2": (3, 2),
    "2:3": (2, 3),
    "16:9": (16, 9),
    "9:16": (9, 16),
    "21:9": (21, 9),
    "9:21": (9, 21),
}
DEFAULT_ASPECT = "1:1"


@cache
def preset_size(tier: str, aspect: str) -> tuple[int, int]:
    """(width, height) for a tier and aspect: multiples of 16, area close to the tier's, ratio close to the aspect's."""
    t, (aw, ah) = TIERS[tier], ASPECTS[aspect]
    ratio = aw / ah
    ideal_w, ideal_h = math.sqrt(t.area * ratio), math.sqrt(t.area / ratio)

    def around(x: float) -> list[int]:
        base = int(x // SIZE_MULTIPLE) * SIZE_MULTIPLE
        return [base - SIZE_MULTIPLE, base, base + SIZE_MULTIPLE, base + 2 * SIZE_MULTIPLE]

    def cost(wh: tuple[int, int]) -> float:
        w, h = wh
        return abs(math.log(w * h / t.area)) + abs(math.log((w / h) / ratio))

    return min(((w, h) for w in around(ideal_w) for h in around(ideal_h)), key=cost)


def tier_sizes(tier: str) -> set[tuple[int, int]]:
    """Every (width, height) the tier has, one per aspect ratio."""
    return {preset_size(tier, aspect) for aspect in ASPECTS}


def tier_for_size(width: int, height: int) -> Tier:
    """The smallest tier whose area covers a custom size (decides VAE tiling and memory plans)."""
    area = width * height
    for tier in TIERS.values():
        if area <= tier.area * (1 + AREA_TOLERANCE):
            return tier
    return TIERS["Ultra"]


def size_label(tier: str, aspect: str) -> str:
    w, h = preset_size(tier, aspect)
    return f"{w}×{h}"
