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
    # Editing (image-to-image, inpainting): see resolve_edit. `task` None infers it from the inputs. For an
    # edit, `aspect` None (and no width/height) means "the input's size, snapped to multiples of 16".
    task: str | None = None
    image: Any = None  # the init image: encoded bytes (PNG, JPEG or WebP) or a PIL image
    mask: Any = None  # where to repaint: transparent pixels if it has any, else white (>= 128) pixels
    strength: Union[float, str, None] = None  # 0..1: how far from the input the result may go
    # LoRAs from the folder (see parse_loras): [{"name": "ink", "scale": 0.8}, ...], (name, scale) pairs,
    # LoraSpec, or text "ink:0.8, oil". `<lora:name:scale>` tags in the prompt are added to these.
    loras: Any = None


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
    # Editing: the init image and mask already at width x height (mask: "L", 255 = repaint, 0 = keep).
    init_image: Any = None
    mask: Any = None
    strength: float | None = None
    input_sha256: str | None = None  # of the input image as sent (its file bytes), for the PNG metadata
    loras: tuple["LoraSpec", ...] = ()  # validated names and scales; the engine checks they exist and fit

    @property
    def denoise_steps(self) -> int:
        """Transformer steps per image: all of them for text-to-image, the last `strength` of them for an edit."""
        return self.steps if self.strength is None else edit_steps(self.steps, self.strength)


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
    task: str = "text-to-image"
    strength: float | None = None
    input_sha256: str | None = None
    loras: list[dict] = field(default_factory=list)  # as applied: name, scale, hash (A1111 short), sha256
    replica: str | None = None  # the Ray Serve replica that ran it (replicas.py); None in process


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
    if _is_edit(request):
        return resolve_edit(request)
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
    prompt, tagged = parse_prompt_loras(cleaned)  # <lora:name:scale> tags leave the text here
    prompt = prompt.strip()
    if not prompt:
        raise RequestError("prompt is empty: describe the image you want" +
                           (" (besides the <lora:...> tags)" if tagged else ""), "prompt")
    loras = merge_loras(parse_loras(request.loras), tagged)

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
               seeds=seeds, warnings=tuple(warnings), loras=loras)


def _find(table: dict, name: Any):
    """Case-insensitive lookup of a preset name."""
    if not isinstance(name, str):
        return None
    for key, value in table.items():
        if key.lower() == name.strip().lower():
            return value
    return None


# ---- editing: image-to-image and inpainting ------------------------------------------------------------------
TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT = "text-to-image", "image-to-image", "inpaint"
TASKS = (TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT)
DEFAULT_STRENGTH = {IMAGE_TO_IMAGE: 0.6, INPAINT: 1.0}  # inpainting repaints the masked area from scratch
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_INPUT_BYTES = 20 << 20  # 20 MiB per input file
# Checked from the header, before any pixel is decoded: a 20000x20000 "decompression bomb" is refused at once.
MAX_INPUT_PIXELS = 40_000_000  # a 40 MP photo decodes to 160 MB of RGBA; PIL's own bomb check sits at 179 MP
MAX_OUTPUT_AREA = presets.TIERS["Ultra"].side ** 2  # an input larger than this is scaled down for the output


def edit_steps(steps: int, strength: float) -> int:
    """Transformer steps an edit runs: the last `strength` of the schedule, as diffusers counts them
    (ZImageImg2ImgPipeline.get_timesteps). 0 (strength 0): the input comes back unchanged."""
    return steps - int(max(steps - steps * strength, 0))


def _is_edit(request: GenerationRequest) -> bool:
    return (getattr(request, "task", None) not in (None, TEXT_TO_IMAGE) or getattr(request, "image", None) is not None
            or getattr(request, "mask", None) is not None or getattr(request, "strength", None) is not None)


def open_image(data: Any, param: str = "image"):
    """The one check of every input image: bytes (PNG, JPEG or WebP, at most MAX_INPUT_BYTES, at most
    MAX_INPUT_PIXELS read from the header before decoding) or a PIL image. Returns (loaded PIL image, sha256
    of the file bytes, or of the pixels for a PIL image). RequestError(param) says what is wrong."""
    import hashlib
    import io

    import PIL.Image

    if isinstance(data, PIL.Image.Image):
        image = data
        _check_pixels(image.width, image.height, param)
        digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode() + image.tobytes()).hexdigest()
        return image, digest
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise RequestError(f"{param} must be an image file (PNG, JPEG or WebP); got {type(data).__name__}", param)
    if not data:
        raise RequestError(f"{param} is empty: send a PNG, JPEG or WebP file", param)
    if len(data) > MAX_INPUT_BYTES:
        raise RequestError(f"{param} is {len(data)} bytes; the limit is {MAX_INPUT_BYTES} ({MAX_INPUT_BYTES >> 20} MiB)",
                           param)
    try:
        image = PIL.Image.open(io.BytesIO(data))  # reads the header only
    except PIL.Image.DecompressionBombError:
        raise RequestError(f"{param} is too large: the limit is {MAX_INPUT_PIXELS / 1e6:.0f} MP", param) from None
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(f"{param} is not an image this server reads: send a PNG, JPEG or WebP file", param) from None
    if image.format not in INPUT_FORMATS:
        raise RequestError(f"{param} is {image.format}; send a PNG, JPEG or WebP file", param)
    _check_pixels(image.width, image.height, param)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
        raise RequestError(f"{param} could not be decoded ({str(exc)[:120]}): is the file complete?", param) from None
    return image, hashlib.sha256(data).hexdigest()


def _check_pixels(width: int, height: int, param: str) -> None:
    if width * height > MAX_INPUT_PIXELS:
        raise RequestError(f"{param} is too large: {width}x{height} is {width * height / 1e6:.0f} MP; the limit is "
                           f"{MAX_INPUT_PIXELS / 1e6:.0f} MP: scale it down first", param)
    if min(width, height) < 1:
        raise RequestError(f"{param} has no pixels ({width}x{height})", param)


def mask_area(mask) -> Any:
    """The area to repaint as an "L" image, 255 = repaint: the transparent pixels (alpha < 128) of a mask that has
    any (OpenAI's convention), otherwise its white pixels (grey level >= 128, diffusers' convention)."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha.point(lambda v: 255 if v < 128 else 0)
    return mask.convert("L").point(lambda v: 255 if v >= 128 else 0)


def snapped_size(width: int, height: int) -> tuple[int, int]:
    """An input's size as an output size: multiples of SIZE_MULTIPLE, the same aspect ratio, sides within
    MIN_SIDE..MAX_SIDE and the area at most MAX_OUTPUT_AREA (larger inputs are scaled down, tiny ones up)."""
    import math

    scale = min(1.0, math.sqrt(MAX_OUTPUT_AREA / (width * height)), presets.MAX_SIDE / max(width, height))
    scale = max(scale, presets.MIN_SIDE / min(width, height))
    m = presets.SIZE_MULTIPLE

    def snap(v: float) -> int:
        return min(presets.MAX_SIDE, max(presets.MIN_SIDE, int(round(v / m)) * m))

    return snap(width * scale), snap(height * scale)


def fit(image, width: int, height: int, resample):
    """`image` at width x height: scaled to cover, then centre-cropped (the aspect ratio is never stretched)."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    resized = image.resize((w, h), resample)
    left, top = (w - width) // 2, (h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _as_strength(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RequestError(f"strength must be a number from 0 to 1; got {value!r}", "strength") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RequestError(f"strength must be a number from 0 to 1; got {value!r}", "strength")
    if not 0.0 <= value <= 1.0:
        raise RequestError(f"strength {value:g} is out of range: use 0 (keep the input) to 1 (repaint it fully)",
                           "strength")
    return float(value)


def resolve_edit(request: GenerationRequest) -> Job:
    """Validate an image-to-image or inpainting request: the text-to-image checks (prompt, steps, n, seed,
    quality, size) plus the inputs. The output size is the one asked (width/height, or the preset's with
    `aspect`), else the input's size snapped to multiples of 16 (a warning says so)."""
    import dataclasses

    import PIL.Image

    task = request.task
    if task is not None and task not in TASKS:
        raise RequestError(f"unknown task {task!r}: use one of {', '.join(TASKS)}", "task")
    if request.image is None:
        if task in (IMAGE_TO_IMAGE, INPAINT) or request.mask is not None or request.strength is not None:
            raise RequestError("an edit needs an input image: send `image` (PNG, JPEG or WebP)", "image")
        return resolve(dataclasses.replace(request, task=None))
    if task == TEXT_TO_IMAGE:
        raise RequestError("text-to-image takes no input image: leave `image` out, or ask for image-to-image",
                           "image")
    if task is None:
        task = INPAINT if request.mask is not None else IMAGE_TO_IMAGE
    if task == INPAINT and request.mask is None:
        raise RequestError("inpainting needs a mask: send `mask` (transparent or white pixels = the area to repaint)",
                           "mask")
    if task == IMAGE_TO_IMAGE and request.mask is not None:
        raise RequestError("image-to-image takes no mask: leave `mask` out, or ask for inpaint", "mask")
    strength = DEFAULT_STRENGTH[task] if request.strength is None else _as_strength(request.strength)

    image, digest = open_image(request.image, "image")
    mask = None
    if request.mask is not None:
        mask_image, _ = open_image(request.mask, "mask")
        if mask_image.size != image.size:
            raise RequestError(f"mask is {mask_image.width}x{mask_image.height} but image is {image.width}x"
                               f"{image.height}: the mask must be the image's size", "mask")
        mask = mask_area(mask_image)
        if mask.getextrema()[1] == 0:
            raise RequestError("mask is empty: make the area to repaint transparent (or white)", "mask")

    warnings: list[str] = []
    from_image = request.width is None and request.height is None and request.aspect is None
    base = dataclasses.replace(request, task=None, image=None, mask=None, strength=None)
    if from_image:
        width, height = snapped_size(image.width, image.height)
        base = dataclasses.replace(base, width=width, height=height)
        if (width, height) != image.size:
            warnings.append(f"output is {width}x{height}: the input's {image.width}x{image.height} snapped to "
                            f"multiples of {presets.SIZE_MULTIPLE} keeping its aspect ratio")
    job = resolve(base)
    job_warnings = [w for w in job.warnings if not (from_image and "is not a" in w and "preset size" in w)]
    if not from_image and abs(image.width / image.height - job.width / job.height) > 0.01:
        warnings.append(f"the input ({image.width}x{image.height}) was scaled and centre-cropped to the output's "
                        f"{job.width}x{job.height}")
    init = fit(image.convert("RGB"), job.width, job.height, PIL.Image.Resampling.LANCZOS)
    if mask is not None:
        mask = fit(mask, job.width, job.height, PIL.Image.Resampling.NEAREST)
    if edit_steps(job.steps, strength) == 0:
        warnings.append(f"strength {strength:g} with {job.steps} steps runs no denoising step: the result is the "
                        "input image")
    return dataclasses.replace(job, task=task, init_image=init, mask=mask, strength=strength, input_sha256=digest,
                               warnings=tuple(job_warnings + warnings))


# ---- LoRAs: names and scales (the engine checks that each name is a file in its folder and that they fit) ----------
MAX_LORAS = 8  # the most --max-loras may allow; the engine applies the configured limit (check_lora_limit)
DEFAULT_MAX_LORAS = 4
LORA_SCALE_LIMIT = 4.0  # |scale| <= this
# A LoRA is named by its file's stem. Letters, digits, '_', '.', '-', '+' and inner spaces; never a path.
LORA_NAME = re.compile(r"[^\W_]|\w[\w.+ -]{0,98}[\w.+-]", re.UNICODE)
_LORA_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraSpec:
    name: str
    scale: float = 1.0
    source: str = "loras"  # "loras" (the request field) or "prompt" (a <lora:...> tag): names the field in errors


def lora_name_problem(name: Any) -> str | None:
    """Why `name` cannot name a LoRA in the folder, or None. Names are file stems, never paths."""
    if not isinstance(name, str) or not name:
        return f"a LoRA name must be non-empty text; got {name!r}"
    if "/" in name or "\\" in name or ".." in name or name.startswith("."):
        return f"LoRA name {name[:60]!r} looks like a path: give the name of a file in the LoRA folder, without folders"
    if not LORA_NAME.fullmatch(name):
        return (f"LoRA name {name[:60]!r} is not valid: use the file's name without '.safetensors' (letters, digits, "
                "'_', '-', '.', '+' and spaces, up to 100 characters)")
    return None


def _as_scale(value: Any, name: str, param: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RequestError(f"LoRA {name!r}: scale must be a number from {-LORA_SCALE_LIMIT:g} to "
                               f"{LORA_SCALE_LIMIT:g}; got {value!r}", param) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RequestError(f"LoRA {name!r}: scale must be a number from {-LORA_SCALE_LIMIT:g} to "
                           f"{LORA_SCALE_LIMIT:g}; got {value!r}", param)
    if not -LORA_SCALE_LIMIT <= value <= LORA_SCALE_LIMIT:
        raise RequestError(f"LoRA {name!r}: scale {value:g} is out of range: use {-LORA_SCALE_LIMIT:g} to "
                           f"{LORA_SCALE_LIMIT:g} (1 is the LoRA as trained, 0 turns it off)", param)
    return float(value)


def _spec(name: Any, scale: Any, source: str) -> LoraSpec:
    param = "prompt" if source == "prompt" else "loras"
    if isinstance(name, str):
        name = name.strip()
    problem = lora_name_problem(name)
    if problem:
        raise RequestError(problem, param)
    return LoraSpec(name, 1.0 if scale is None else _as_scale(scale, name, param), source)


def parse_prompt_loras(prompt: str) -> tuple[str, tuple[LoraSpec, ...]]:
    """A1111's prompt syntax: `<lora:name:scale>` anywhere (a bare `<lora:name>` is scale 1). Returns the prompt
    without the tags (unchanged when it has none) and the LoRAs in order."""
    if "<" not in prompt or not _LORA_TAG.search(prompt):
        return prompt, ()
    specs = []
    for match in _LORA_TAG.finditer(prompt):
        parts = match.group(1).split(":")
        if len(parts) > 2:
            raise RequestError(f"{match.group(0)[:80]!r}: write <lora:name:scale> (one scale; this model has no "
                               "text-encoder LoRA part)", "prompt")
        specs.append(_spec(parts[0], parts[1] if len(parts) == 2 and parts[1].strip() else None, "prompt"))
    text = _LORA_TAG.sub(" ", prompt)
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r" +([,.;:!?，。])", r"\1", text)  # "a cat <lora:x>, red" -> "a cat, red"
    return text.strip(), tuple(specs)


def parse_loras(value: Any) -> tuple[LoraSpec, ...]:
    """The request's `loras` field: None; a list of {"name", "scale"} objects, (name, scale) pairs, names or
    LoraSpec; or text "ink:0.8, oil" (also "<lora:ink:0.8>"), the form the UI and the Gradio API send."""
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        if len(value) > MAX_PROMPT_CHARS:
            raise RequestError(f"loras is {len(value)} characters; the limit is {MAX_PROMPT_CHARS}", "loras")
        if value.lstrip().startswith(("[", "{")):  # JSON, as a multipart form field carries it
            import json

            try:
                return parse_loras(json.loads(value))
            except (ValueError, RecursionError):
                raise RequestError('loras is not valid JSON: send [{"name": "ink", "scale": 0.8}] or "ink:0.8"',
                                   "loras") from None
        rest, tagged = parse_prompt_loras(value)
        specs = [LoraSpec(s.name, s.scale, "loras") for s in tagged]
        for item in filter(None, (t.strip() for t in re.split(r"[,\n;]", rest))):
            name, _, scale = item.rpartition(":") if ":" in item else (item, "", None)
            specs.append(_spec(name, scale if scale not in (None, "") else None, "loras"))
        return tuple(specs)
    if isinstance(value, (dict, LoraSpec)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise RequestError('loras must be a list like [{"name": "ink", "scale": 0.8}]; got '
                           f"{type(value).__name__}", "loras")
    if len(value) > MAX_LORAS * 4:
        raise RequestError(f"loras lists {len(value)} entries; at most {MAX_LORAS} are allowed", "loras")
    specs = []
    for item in value:
        if isinstance(item, LoraSpec):
            specs.append(_spec(item.name, item.scale, "loras"))
        elif isinstance(item, dict):
            unknown = set(item) - {"name", "scale", "weight"}
            if unknown or "name" not in item:
                raise RequestError('each LoRA is {"name": <file name without .safetensors>, "scale": <number>}; got '
                                   f"{str(item)[:120]}", "loras")
            specs.append(_spec(item["name"], item.get("scale", item.get("weight")), "loras"))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            specs.append(_spec(item[0], item[1], "loras"))
        elif isinstance(item, str):
            specs.extend(parse_loras(item))
        else:
            raise RequestError('each LoRA is {"name": <file name without .safetensors>, "scale": <number>}; got '
                               f"{str(item)[:120]}", "loras")
    return tuple(specs)


def merge_loras(given: tuple[LoraSpec, ...], tagged: tuple[LoraSpec, ...]) -> tuple[LoraSpec, ...]:
    """The request's LoRAs, then the prompt's; each name once, at most MAX_LORAS (the engine applies
    --max-loras with check_lora_limit)."""
    specs = given + tagged
    seen: dict[str, LoraSpec] = {}
    for spec in specs:
        if spec.name in seen:
            where = "in the prompt and in loras" if seen[spec.name].source != spec.source else (
                "twice in the prompt" if spec.source == "prompt" else "twice in loras")
            raise RequestError(f"LoRA {spec.name!r} is given {where}: give it once, with one scale",
                               "prompt" if spec.source == "prompt" else "loras")
        seen[spec.name] = spec
    if len(specs) > MAX_LORAS:
        raise RequestError(f"{len(specs)} LoRAs asked; at most {MAX_LORAS} are allowed per request", "loras")
    return specs


def check_lora_limit(job: Job, max_loras: int) -> None:
    """The configured limit (--max-loras), applied by the engine; 0 means LoRAs are off."""
    if not job.loras:
        return
    if max_loras <= 0:
        raise RequestError("LoRAs are turned off on this server (--max-loras 0 or --lora-rank 0)", "loras")
    if len(job.loras) > max_loras:
        raise RequestError(f"{len(job.loras)} LoRAs asked; this server allows at most {max_loras} per request "
                           "(--max-loras)", "loras")


def lora_tags(loras) -> str:
    """`<lora:name:scale>` tags for LoRAs (LoraSpec or dicts with name and scale), A1111's prompt syntax."""
    out = []
    for item in loras:
        name, scale = (item["name"], item["scale"]) if isinstance(item, dict) else (item.name, item.scale)
        out.append(f"<lora:{name}:{scale:g}>")
    return " ".join(out)
