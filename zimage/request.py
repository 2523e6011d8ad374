"""What a caller asks the engine for, what it gets back, and the errors it can see.

Validation lives here so that every front end (UI, Gradio API, JSON API, warmup) gives the same messages
for the same mistakes. `RequestError.param` names the offending field, for API error bodies.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Union

from . import presets, security

MAX_IMAGES = 4
SEED_MAX = 2**32 - 1
MAX_PROMPT_CHARS = 16_384  # far past the text encoder's 512 tokens; longer is refused, not tokenized


class EngineError(Exception):
    """Base of the errors the engine raises on purpose; `str()` is a message fit for users."""


class RequestError(EngineError):
    """The request cannot be served as asked; the message says what to change."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class GenerationCancelled(EngineError):
    """The caller cancelled; memory was released."""


class OutOfMemory(EngineError):
    """Out of GPU memory even with the lower-memory plan; the message suggests a smaller request."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


class EngineUnavailable(EngineError):
    """The engine is not loaded yet, or a fatal error made it untrustworthy (it waits for a restart)."""


IntLike = Union[int, float, str, None]  # what callers send; numeric strings and whole floats are accepted


@dataclass(frozen=True)
class GenerationRequest:
    """A request as callers give it, not yet validated (`resolve` checks every field and says what is wrong).
    Either `preset` (+ `aspect`) or `width` and `height`.

    `seed` None or -1 draws a random seed; image i of n gets seed + i, so each image can be remade alone.
    """

    prompt: str
    preset: str | None = presets.DEFAULT_TIER
    aspect: str | None = presets.DEFAULT_ASPECT
    width: IntLike = None
    height: IntLike = None
    steps: IntLike = None
    seed: IntLike = None
    n: IntLike = 1


@dataclass(frozen=True)
class Job:
    """A validated request: everything the engine needs, nothing left to default."""

    prompt: str
    preset: str  # the label results and metrics carry: a tier name, or "Custom" for a size no preset has
    tier: str  # the tier whose memory plan and refusal rules apply (for a custom size: the smallest covering it)
    width: int
    height: int
    steps: int
    seeds: tuple[int, ...]
    task: str = "text-to-image"
    # The memory plan, decided once by the engine's placement when it resolves the job (memory.Placement.plan).
    vae_tiling: bool = False
    warnings: tuple[str, ...] = ()
    prompt_tokens: int | None = None  # as the pipeline tokenizes it; counted once, before the GPU lock
    keep_latents: bool = False  # return the final latents too (quality checks in benchmarks and GPU tests)


@dataclass
class GenerationResult:
    images: list  # PIL images, in seed order
    seeds: list[int]
    prompt: str
    preset: str
    width: int
    height: int
    steps: int
    timings: dict[str, float]  # seconds: text_encode, denoise, decode (summed over images), total
    peak_vram_bytes: int | None
    warnings: list[str] = field(default_factory=list)
    oom_retries: int = 0
    latents: list | None = None  # final latents (float32, CPU) when asked for: quality checks compare them


def _as_int(value: Any, param: str, what: str) -> int:
    if isinstance(value, bool) or value is None:
        raise RequestError(f"{param} must be {what}; got {value!r}", param)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,20}\s*", value):
        value = int(value)
    if not isinstance(value, int):
        raise RequestError(f"{param} must be {what}; got {value!r}", param)
    return value


def resolve(request: GenerationRequest) -> Job:
    """Validate a request; raises RequestError with a message that says what to change."""
    warnings: list[str] = []

    prompt = request.prompt
    if not isinstance(prompt, str):
        raise RequestError(f"prompt must be text; got {type(prompt).__name__}", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(
            f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS} "
            "(the text encoder reads only the first 512 tokens anyway)", "prompt")
    try:
        cleaned, removed = security.clean_prompt(prompt)  # before any tokenizer sees it
    except security.UnsafeText as exc:
        raise RequestError(str(exc), "prompt") from None
    if removed:
        warnings.append(removed)
    prompt = cleaned.strip()
    if not prompt:
        raise RequestError("prompt is empty: describe the image you want", "prompt")

    custom = request.width is not None or request.height is not None
    if custom:
        if request.width is None or request.height is None:
            raise RequestError("give both width and height, or neither (to use the preset's size)",
                               "width" if request.width is None else "height")
        width = _as_int(request.width, "width", "an integer number of pixels")
        height = _as_int(request.height, "height", "an integer number of pixels")
        for name, v in (("width", width), ("height", height)):
            if not presets.MIN_SIDE <= v <= presets.MAX_SIDE:
                raise RequestError(f"{name} {v} is out of range: use {presets.MIN_SIDE} to {presets.MAX_SIDE}", name)
            if v % presets.SIZE_MULTIPLE:
                lo = v // presets.SIZE_MULTIPLE * presets.SIZE_MULTIPLE
                raise RequestError(f"{name} {v} is not a multiple of {presets.SIZE_MULTIPLE}: "
                                   f"try {lo} or {lo + presets.SIZE_MULTIPLE}", name)

    tier_name = request.preset if request.preset is not None else presets.DEFAULT_TIER
    tier = _find(presets.TIERS, tier_name)
    if tier is None:
        raise RequestError(f"unknown quality preset {tier_name!r}: use one of {', '.join(presets.TIERS)}", "preset")
    if custom:
        # A size that is one of the asked tier's preset sizes is that preset; any other size is "Custom", and
        # the tier then only supplies the default steps.
        if (width, height) in presets.tier_sizes(tier.name):
            preset_label, size_tier = tier.name, tier
        else:
            preset_label, size_tier = "Custom", presets.tier_for_size(width, height)
            if request.preset is not None:
                warnings.append(f"size {width}x{height} is not a {tier.name} preset size; generated at that size "
                                f"with {tier.name}'s defaults otherwise (reported as Custom)")
    else:
        aspect = request.aspect if request.aspect is not None else presets.DEFAULT_ASPECT
        aspect_name = aspect if isinstance(aspect, str) and aspect in presets.ASPECTS else None
        if aspect_name is None:
            raise RequestError(f"unknown aspect ratio {aspect!r}: use one of {', '.join(presets.ASPECTS)}", "aspect")
        width, height = presets.preset_size(tier.name, aspect_name)
        preset_label, size_tier = tier.name, tier

    if request.steps is None:
        steps = tier.steps
    else:
        steps = _as_int(request.steps, "steps", f"an integer from {presets.MIN_STEPS} to {presets.MAX_STEPS}")
        if not presets.MIN_STEPS <= steps <= presets.MAX_STEPS:
            raise RequestError(f"steps {steps} is out of range: use {presets.MIN_STEPS} to {presets.MAX_STEPS} "
                               f"(Turbo is distilled for 8)", "steps")

    n = _as_int(request.n, "n", f"an integer from 1 to {MAX_IMAGES}")
    if not 1 <= n <= MAX_IMAGES:
        raise RequestError(f"n {n} is out of range: ask for 1 to {MAX_IMAGES} images", "n")

    if request.seed is None or (not isinstance(request.seed, bool) and request.seed in (-1, "-1")):
        seed = secrets.randbelow(SEED_MAX + 1)
    else:
        seed = _as_int(request.seed, "seed", f"an integer from 0 to {SEED_MAX}, or -1 for random")
        if not 0 <= seed <= SEED_MAX:
            raise RequestError(f"seed {seed} is out of range: use 0 to {SEED_MAX}, or -1 for random", "seed")
    seeds = tuple((seed + i) % (SEED_MAX + 1) for i in range(n))

    return Job(prompt=prompt, preset=preset_label, tier=size_tier.name, width=width, height=height, steps=steps,
               seeds=seeds, warnings=tuple(warnings))


def _find(table: dict, name: Any):
    """Case-insensitive lookup of a preset name."""
    if not isinstance(name, str):
        return None
    for key, value in table.items():
        if key.lower() == name.strip().lower():
            return value
    return None
