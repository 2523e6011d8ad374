"""The three stages of a generation -- text encode, denoise, VAE decode -- and their out-of-memory ladder.

Owned and called by the engine under its GPU lock; nothing else uses this module. Each stage runs through
the real diffusers `ZImagePipeline` (`encode_prompt`; the pipeline with `output_type="latent"`; the VAE), is
timed, and has its own retry:

    stage fails with torch.OutOfMemoryError
      -> report "handled" (the engine logs "oom handled" and counts it), free memory, retry once with a
         lower-memory plan (decode: tiled VAE; encode/denoise: text encoder moved off the GPU)
      -> fails again: report "failed", raise OutOfMemory with the size, free/total memory and a smaller
         preset to try.

A task is a `Job.task` value and a row of TASK_PIPELINES: text-to-image, image-to-image and inpainting share
this encode / denoise / decode shape and its ladder. An edit's inputs are prepared once per job (`prepare`:
the init image as the pipeline's tensor), the task's diffusers pipeline (built from the same components,
so it shares weights and the compiled transformer) encodes it, noises it to `strength` and denoises with
`output_type="latent"`, and the engine's own decode follows. Inpainting then pastes the input back outside
the mask (feathered inward), so pixels outside the mask are exactly the input's.
"""

from __future__ import annotations

import collections
import copyreg
import functools
import logging
import threading
import time
from typing import Callable

import numpy as np
import PIL.Image
import torch

from . import caption_once, cudagraph, memory, presets
from .request import GenerationCancelled, GenerationResult, Job, OutOfMemory
from .units import GIB

log = logging.getLogger("zimage.engine")  # the engine's log: the monitor reads "oom handled" lines from it

MAX_SEQUENCE_LENGTH = 512  # text encoder tokens the pipeline reads; longer prompts are truncated
# The pipeline pads every prompt to 512 tokens before the text encoder. The encoder is causal and the padding
# sits after the prompt, so the prompt's hidden states do not depend on it: padding only to the next multiple
# of 64 gives the same embeddings for a fraction of the work, with at most 8 shapes for the compiled encoder.
# (On the H100 the compiled encoder is launch-bound: half the FLOPs, same time. It pays where the encoder is
# compute-bound: CPU, eager, streamed from host memory.)
ENCODE_BUCKET = 64

ProgressFn = Callable[[int, int], None]
# Job.task -> the diffusers pipeline class that runs its denoising (all built from the loaded pipeline's components).
TASK_PIPELINES = {"text-to-image": "ZImagePipeline", "image-to-image": "ZImageImg2ImgPipeline",
                  "inpaint": "ZImageInpaintPipeline"}
MASK_FEATHER = 3  # pixels: the pasted-back input fades into the repainted area over about this width
# (kind "handled" | "failed", stage, job, action taken): the engine logs and counts it, and decides on fatal.
OomReport = Callable[[str, str, Job, str], None]


def encode_length(n_tokens: int) -> int:
    return min(MAX_SEQUENCE_LENGTH, -(-n_tokens // ENCODE_BUCKET) * ENCODE_BUCKET)


def chat_text(tokenizer, prompt: str) -> str:
    """The prompt in the chat template, as ZImagePipeline gives it to the tokenizer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)


def count_prompt_tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer(chat_text(tokenizer, prompt)).input_ids)  # as the pipeline tokenizes it


class Stages:
    def __init__(self, pipe, placement: memory.Placement, device: str, embed_cache_size: int, report_oom: OomReport,
                 stats):
        self.pipe, self.placement, self.device = pipe, placement, device
        self.embed_cache_size = embed_cache_size
        self.report_oom = report_oom
        self.stats = stats  # the engine's EngineStats
        self.overlap = True  # queue the stages without waiting between them (switch overlap_stages; StageClock)
        self.while_waiting: Callable[[], None] | None = None  # run before the wait for the last stage (the engine's)
        self._embed_cache: collections.OrderedDict[str, list[torch.Tensor]] = collections.OrderedDict()
        self.task_pipes = task_pipelines(pipe)
        for task_pipe in self.task_pipes.values():
            pin_execution_device(task_pipe, device)
        pin_dtype(pipe.transformer)  # the pipelines read it every step

    def run(self, job: Job, on_progress: ProgressFn, cancel: threading.Event) -> GenerationResult:
        on_gpu = self.device.startswith("cuda")
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        clock = StageClock(self.device, self.overlap)
        warnings, recoveries = list(job.warnings), []
        total_steps = job.denoise_steps * len(job.seeds)
        init = self.prepare(job)  # an edit's input tensor, once per job
        t_start = time.perf_counter()

        def check_cancel():
            if cancel.is_set():
                raise GenerationCancelled("cancelled")

        # Each image: the input image (strength 0), or (pixels, pixels finite, latents finite) still on their way
        # to the host -- read once, after the last stage (see StageClock).
        pending: list = []
        with torch.no_grad():
            check_cancel()
            embeds = clock.time("text_encode", lambda: self._with_oom_retry(
                "text_encode", job, lambda: self.encode(job.prompt, job.prompt_tokens),
                lambda: self.encode(job.prompt, job.prompt_tokens, shed=True), "text encoder on CPU", recoveries))
            kept_latents = []
            for index, seed in enumerate(job.seeds):
                check_cancel()
                if job.task != "text-to-image" and job.denoise_steps == 0:  # strength 0: nothing to change
                    pending.append(job.init_image.copy())
                    continue
                offset = index * job.denoise_steps
                latents = clock.time("denoise", lambda: self._with_oom_retry(
                    "denoise", job, lambda: self.denoise(job, embeds, seed, offset, total_steps, on_progress, cancel,
                                                         init=init),
                    lambda: self.denoise(job, embeds, seed, offset, total_steps, on_progress, cancel, shed=True,
                                         init=init),
                    "text encoder moved off the GPU", recoveries))
                check_cancel()
                latents_finite = to_host(torch.isfinite(latents).all())
                if job.keep_latents:
                    kept_latents.append(latents.float().cpu())
                tiled = self.placement.decode_tiled(job.vae_tiling, job.width, job.height)
                pixels, finite = clock.time("decode", lambda: self._with_oom_retry(
                    "decode", job, lambda: self.decode(latents, tiled=tiled),
                    lambda: self.decode(latents, tiled=True), "tiled VAE decode", recoveries))
                pending.append((pixels, finite, latents_finite))
                del latents
        if self.while_waiting is not None:
            self.while_waiting()  # host work that fits while the device finishes the last stage
        timings = clock.finish()  # the one wait for the device
        images = []
        for index, (seed, item) in enumerate(zip(job.seeds, pending)):
            if isinstance(item, PIL.Image.Image):
                images.append(item)
                continue
            pixels, finite, latents_finite = item
            if not bool(latents_finite):
                warnings.append(f"image {index + 1} (seed {seed}) has non-finite latents; it will look wrong")
            images.append(self.to_image(pixels, finite))
            if job.task == "inpaint":
                images[-1] = paste_back(images[-1], job.init_image, job.mask)
        timings["total"] = round(time.perf_counter() - t_start, 4)
        peak = torch.cuda.max_memory_allocated(self.device) if on_gpu else None
        warnings += [f"ran out of GPU memory in {r}; recovered" for r in recoveries]
        return GenerationResult(images=images, seeds=list(job.seeds), prompt=job.prompt, preset=job.preset,
                                width=job.width, height=job.height, steps=job.steps, timings=timings,
                                peak_vram_bytes=peak, warnings=warnings, oom_retries=len(recoveries),
                                latents=kept_latents or None, task=job.task, strength=job.strength,
                                input_sha256=job.input_sha256)

    # ---- the stages ------------------------------------------------------------------------------
    def encode(self, prompt: str, n_tokens: int | None = None, shed: bool = False) -> list[torch.Tensor]:
        cached = self._embed_cache.get(prompt)
        if cached is not None:
            self._embed_cache.move_to_end(prompt)
            return cached
        if shed:
            self.placement.shed_text_encoder()
        else:
            self.placement.before_encode()
        length = encode_length(n_tokens or count_prompt_tokens(self.pipe.tokenizer, prompt))
        embeds = encode_prompt(self.pipe, prompt, self.placement.text_encoder_device, length)
        embeds = [e.to(self.device) for e in embeds]
        if self.embed_cache_size > 0:
            self._embed_cache[prompt] = embeds
            while len(self._embed_cache) > self.embed_cache_size:
                self._embed_cache.popitem(last=False)
        return embeds

    def denoise(self, job: Job, embeds, seed: int, offset: int, total: int, on_progress: ProgressFn,
                cancel: threading.Event, shed: bool = False, init: torch.Tensor | None = None) -> torch.Tensor:
        if shed:
            self.placement.shed_text_encoder()

        def on_step_end(pipe, step, timestep, tensors):
            on_progress(offset + step + 1, total)
            if cancel.is_set():
                pipe._interrupt = True  # diffusers skips the remaining steps
            return tensors

        # CPU generator: the same seed gives the same noise on any GPU or on CPU.
        pipe, inputs = self.task_pipes[job.task], {}
        if job.task != "text-to-image":
            inputs = dict(image=init if init is not None else self.prepare(job), strength=job.strength)
            if job.task == "inpaint":
                inputs["mask_image"] = job.mask
        with caption_once.scope(pipe.transformer):
            out = pipe(**inputs, prompt_embeds=embeds, height=job.height, width=job.width,
                       num_inference_steps=job.steps, guidance_scale=presets.GUIDANCE_SCALE,
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                       callback_on_step_end=on_step_end, max_sequence_length=MAX_SEQUENCE_LENGTH)
        return out.images

    def prepare(self, job: Job) -> torch.Tensor | None:
        """An edit's init image as the pipeline's input tensor (1, 3, H, W) in [0, 1] (the pipeline normalizes it
        and VAE-encodes it); once per job."""
        if job.init_image is None:
            return None
        pixels = torch.from_numpy(np.asarray(job.init_image.convert("RGB"), dtype=np.uint8).copy())
        return (pixels.permute(2, 0, 1)[None].to(torch.float32) / 255.0).contiguous()

    def decode(self, latents: torch.Tensor, tiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels (H, W, 3) uint8, an all-finite flag), queued for the host (`to_host`): `to_image` reads them
        once the device has caught up."""
        vae = self.pipe.vae
        graphed = None if tiled else cudagraph.decode_graphs(vae)
        out = graphed(latents) if graphed is not None else None  # None: no graph applies; decode as usual
        if out is None:
            if tiled:
                vae.enable_tiling()
            try:
                out = decode_to_pixels(vae, latents)
            finally:
                if tiled:
                    vae.disable_tiling()
        # A graph's outputs are overwritten by its next replay; the copies are queued before it.
        return to_host(out[0]), to_host(out[1])

    def to_image(self, pixels: torch.Tensor, finite: torch.Tensor) -> PIL.Image.Image:
        if not bool(finite):
            log.warning("non-finite pixels decoded (shown as black)")
            self.stats.nonfinite_images += 1
        return PIL.Image.fromarray(pixels.numpy())

    # ---- out of memory ---------------------------------------------------------------------------
    def _with_oom_retry(self, stage: str, job: Job, run, fallback, fallback_label: str, recoveries: list):
        try:
            return run()
        except torch.OutOfMemoryError:
            self.report_oom("handled", stage, job, f"retry with {fallback_label}")
        # Outside the except block: the traceback's frames (and their tensors) are gone before we retry.
        memory.release_memory(self.device)
        try:
            result = fallback()
        except torch.OutOfMemoryError:
            self.report_oom("failed", stage, job, "giving up")
            memory.release_memory(self.device)
            raise OutOfMemory(oom_message(stage, job, self.device), stage) from None
        recoveries.append(f"{stage} ({fallback_label})")
        return result


class StageClock:
    """Seconds per stage of one generation.

    With `overlap` on a GPU (the switch `overlap_stages`), the host queues each stage's work behind the last one's
    and goes on without waiting: the next stage's Python (the pipeline's set-up, its CPU noise) runs while the GPU
    still works, and the GPU does not sit idle between stages. Each stage is timed by CUDA events around its work,
    read after the one wait at the end (`finish`), so a stage's figure is the GPU's time from the host reaching it
    to its last kernel. Otherwise (CPU, or overlap off): host time, the device synchronised after each stage."""

    STAGES = ("text_encode", "denoise", "decode")

    def __init__(self, device: str, overlap: bool):
        self.device = device
        self.events = overlap and device.startswith("cuda")
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.marks: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def time(self, stage: str, fn):
        if self.events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self.marks.append((stage, start, end))
            return out
        t0 = time.perf_counter()
        out = fn()
        self.synchronize()
        self.seconds[stage] += time.perf_counter() - t0
        return out

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def finish(self) -> dict:
        """Wait for the device; the stages' seconds, rounded to 0.1 ms."""
        self.synchronize()
        for stage, start, end in self.marks:
            self.seconds[stage] += start.elapsed_time(end) / 1000
        return {stage: round(seconds, 4) for stage, seconds in self.seconds.items()}


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy on the host, queued on the current stream (pinned memory, so the host does not wait
    for it): read it after the stream has caught up. A host tensor as it is."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def encode_prompt(pipe, prompt: str, device, max_sequence_length: int) -> list[torch.Tensor]:
    """`ZImagePipeline.encode_prompt(prompt, do_classifier_free_guidance=False)` for one prompt, the same tensors
    (tests/test_engine.py), without its host wait: diffusers drops the padding by indexing the hidden states with
    the attention mask on the device, an `aten::nonzero` that makes the host wait for the whole encoder before it
    can queue anything else. The tokenizer pads on the right, so the prompt is the first `mask.sum()` rows, a count
    the host already has."""
    inputs = pipe.tokenizer([chat_text(pipe.tokenizer, prompt)], padding="max_length", max_length=max_sequence_length, truncation=True,
                            return_tensors="pt")
    mask = inputs.attention_mask[0].bool()
    n_tokens = int(mask.sum())
    right_padded = bool(mask[:n_tokens].all())  # the prompt's rows come first
    hidden = pipe.text_encoder(input_ids=inputs.input_ids.to(device), attention_mask=mask[None].to(device),
                               output_hidden_states=True).hidden_states[-2]
    if right_padded:
        return [hidden[0, :n_tokens].contiguous()]
    return [hidden[0][mask.to(hidden.device)]]  # any other padding: diffusers' own indexing


def decode_to_pixels(vae, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (1, C, h, w) -> (pixels (H, W, 3) uint8 on the latents' device, a 0-dim "all finite" flag): the
    decode the engine runs eagerly and the one cudagraph.GraphedDecode captures (so no host read happens inside).
    Pixels are converted on the device: 4x fewer bytes to copy than float32 (same formula as VaeImageProcessor)."""
    # contiguous: inpainting's latents come out of the channels-last VAE encoder channels-last, and the compiled
    # decoder guards on strides (a second 20 s compile on the first inpaint, H100 2026-11-24).
    scaled = (latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor).contiguous()
    decoded = vae.decode(scaled, return_dict=False)[0]
    finite = torch.isfinite(decoded).all()
    pixels = ((decoded[0].float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous(), finite


def task_pipelines(pipe) -> dict:
    """One pipeline per task over the same components (no second copy of any weight; the compiled transformer,
    placement and offload hooks are the loaded pipeline's). Built as `cls(**pipe.components)`, which is what
    diffusers' `from_pipe` does, without its closing `.to(dtype)` (float32 unless told otherwise) that would
    touch the shared, placed, possibly fp8-quantized or group-offloaded modules."""
    import diffusers

    pipes = {}
    for task, name in TASK_PIPELINES.items():
        cls = getattr(diffusers, name)
        pipes[task] = pipe if isinstance(pipe, cls) and type(pipe) is cls else cls(**pipe.components)
        pipes[task].set_progress_bar_config(disable=True)
    return pipes


def pin_execution_device(pipe, device: str) -> None:
    """Answer diffusers' `_execution_device` from the placement: the property walks every submodule of every
    component looking for offload hooks, once per pipeline call -- 697 + 545 + 241 modules at full size, 5-9 ms of
    host time before each generation's first kernel (measured on the dev CPU). Every memory profile computes on
    the engine's device (streamed modules are onloaded there; the text encoder gets its device explicitly)."""
    if not getattr(type(pipe), "_zimage_pinned", False):
        pipe.__class__ = _pinned_device_class(type(pipe))
    pipe._zimage_execution_device = torch.device(device)


@functools.cache
def _pinned_device_class(cls):
    """`cls` with `_execution_device` read from the instance (same name and module, for logs and reprs)."""
    return _pinned_subclass(cls, {"_zimage_pinned": True,
                                  "_execution_device": property(lambda self: self._zimage_execution_device)})


def _new_instance(cls, *args):
    return cls.__new__(cls, *args)


def _pinned_subclass(cls, namespace: dict):
    """A subclass of `cls` under the same name and module (logs, reprs, diffusers' configs), whose instances pickle as
    `cls` (the name resolves to `cls` when loaded; the pin is not carried over)."""

    def __reduce_ex__(self, protocol):
        reduced = list(super(pinned, self).__reduce_ex__(protocol))
        if len(reduced) > 1 and reduced[1] and reduced[1][0] is pinned:
            if reduced[0] is copyreg.__newobj__:  # pickle insists that __newobj__'s class is the object's
                reduced[0] = _new_instance
            reduced[1] = (cls, *reduced[1][1:])
        return tuple(reduced)

    pinned = type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                         "__reduce_ex__": __reduce_ex__, **namespace})
    return pinned


def pin_dtype(module) -> None:
    """Answer a diffusers model's `dtype` from a cached value: the property walks every submodule looking for casting
    hooks, then the parameters (697 modules at full size, 1.2 ms on the dev CPU), and the pipelines read
    `transformer.dtype` at every step -- once before the first step's kernels, where the GPU waits for it. The cache
    is dropped whenever the module's tensors are converted (`.to`, `.half`, ...: nn.Module._apply)."""
    if not getattr(type(module), "_zimage_pinned_dtype", False):
        module.__class__ = _pinned_dtype_class(type(module))


@functools.cache
def _pinned_dtype_class(cls):
    def dtype(self):
        value = self.__dict__.get("_zimage_dtype")
        if value is None:
            value = self.__dict__["_zimage_dtype"] = super(pinned, self).dtype
        return value

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_zimage_dtype", None)
        return super(pinned, self)._apply(fn, recurse)

    pinned = _pinned_subclass(cls, {"_zimage_pinned_dtype": True, "dtype": property(dtype), "_apply": _apply})
    return pinned


def paste_back(generated: PIL.Image.Image, original: PIL.Image.Image, mask: PIL.Image.Image) -> PIL.Image.Image:
    """Inpainting's result: the input outside the mask, exactly; inside, the generated pixels, blended with the
    input over MASK_FEATHER pixels inward from the mask's edge (no visible seam)."""
    from PIL import ImageChops, ImageFilter

    soft = ImageChops.multiply(mask.filter(ImageFilter.GaussianBlur(MASK_FEATHER)), mask)  # 0 outside the mask
    soft = soft.point(lambda v: min(255, 2 * v))  # fully generated from about a feather width inside the edge
    return PIL.Image.composite(generated.convert("RGB"), original.convert("RGB"), soft)


def memory_note(device: str, template: str, fallback: str) -> str:
    free_total = memory.gpu_memory(device)
    return template.format(free=free_total[0] / GIB, total=free_total[1] / GIB) if free_total else fallback


def oom_message(stage: str, job: Job, device: str) -> str:
    mem = memory_note(device, "{free:.1f} GiB free of {total:.1f} GiB", "memory exhausted")
    smaller = [t for t in presets.TIERS.values() if t.area < job.width * job.height]
    hint = (f"try the {smaller[-1].name} preset" if smaller else "try a smaller size")
    if len(job.seeds) > 1:
        hint += " or fewer images"
    return (f"out of GPU memory in {stage} for {job.width}x{job.height} ({job.preset}) even after a "
            f"lower-memory retry; {mem}. {hint[0].upper() + hint[1:]}.")
