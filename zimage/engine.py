"""The engine: prompt in, images out, one generation at a time per GPU, memory given back after each.

It knows the model and the GPU and nothing of Gradio or HTTP. Front ends call `generate()` from any
thread; a lock serialises the GPU work. Each request runs three stages through the real diffusers
`ZImagePipeline` -- text encode (`encode_prompt`, cached for repeated prompts), denoise (the pipeline
with `output_type="latent"`), VAE decode -- so each stage is timed and has its own out-of-memory retry:

    stage fails with torch.OutOfMemoryError
      -> log "oom handled", free memory, retry once with a lower-memory plan
         (decode: tiled VAE; encode/denoise: text encoder moved off the GPU)
      -> fails again: OutOfMemory with the size, free/total memory and a smaller preset to try.

Log lines the supervision monitor reads (keep them stable):
    "oom handled stage=<stage> ..."   an OOM that the engine recovered from or reported to the caller
    "fatal: <reason>"                 the process should be restarted (CUDA error, or too many OOMs)
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import PIL.Image
import torch

from . import compile_cache, loading, memory, presets, speed
from .request import (EngineUnavailable, GenerationCancelled, GenerationRequest, GenerationResult, Job,
                      OutOfMemory, RequestError, resolve)
from .settings import Settings

log = logging.getLogger("zimage.engine")

MAX_SEQUENCE_LENGTH = 512  # text encoder tokens the pipeline reads; longer prompts are truncated
# The pipeline pads every prompt to 512 tokens before the text encoder. The encoder is causal and the padding
# sits after the prompt, so the prompt's hidden states do not depend on it: padding only to the next multiple
# of 64 gives the same embeddings for a fraction of the work, with at most 8 shapes for the compiled encoder.
# (On the H100 the compiled encoder is launch-bound: half the FLOPs, same time. It pays where the encoder is
# compute-bound: CPU, eager, streamed from host memory.)
ENCODE_BUCKET = 64


def encode_length(n_tokens: int) -> int:
    return min(MAX_SEQUENCE_LENGTH, -(-n_tokens // ENCODE_BUCKET) * ENCODE_BUCKET)


ProgressFn = Callable[[int, int], None]


class FifoLock:
    """A lock granted in arrival order. threading.Lock is not fair: with the UI worker and API threads all
    waiting for the GPU, a caller could be overtaken again and again. `waiting` feeds the queue-depth gauge."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._arrivals: collections.deque[object] = collections.deque()
        self._held = False

    def __enter__(self) -> "FifoLock":
        ticket = object()
        with self._cond:
            self._arrivals.append(ticket)
            while self._held or self._arrivals[0] is not ticket:
                self._cond.wait()
            self._arrivals.popleft()
            self._held = True
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._arrivals)


@dataclass
class EngineStats:
    """Counters front ends export (the engine does not know about Prometheus)."""

    oom: collections.Counter = field(default_factory=collections.Counter)  # handled / failed / fatal
    cancelled: int = 0
    completed: int = 0
    failed: int = 0
    inflight: int = 0
    # Highest number of generations seen inside the GPU stages at once (1 unless the lock is broken), and
    # the deepest wait for the GPU: evidence for load tests that callers overlapped yet never shared the GPU.
    max_concurrent: int = 0
    max_waiting: int = 0
    nonfinite_images: int = 0
    last_peak_vram_bytes: int | None = None


class Engine:
    """Owns the pipeline. States: loading -> warming -> ready; 'failed' if loading failed, 'fatal' after a
    fatal error (then it refuses work until the process is restarted)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = settings.torch_device()
        self.dtype = settings.torch_dtype()
        self.state = "loading"
        self.state_detail = ""
        self.pipe = None
        self.placement: memory.Placement | None = None
        self.attention_backend = "native"
        self.usable_gib: float | None = None
        self.fp8 = False
        self.compiled = False
        self.warm_shapes: list[dict] = []
        self.stats = EngineStats()
        self._gpu_lock = FifoLock()
        self._concurrency_count = threading.Lock()
        self._concurrent = 0
        self._embed_cache: collections.OrderedDict[str, list[torch.Tensor]] = collections.OrderedDict()
        self._oom_times: collections.deque[float] = collections.deque()
        # Cache release after every request (gc + empty_cache). Off only to measure what it costs.
        self.release_after_request = True

    # ---- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def create(cls, settings: Settings) -> "Engine":
        """Load and configure in one call (tests, CLI one-liners, benchmarks)."""
        engine = cls(settings)
        engine.load()
        return engine

    def load(self, pipe=None) -> None:
        """Load the model (or adopt `pipe`), place it for the memory profile, apply the speed switches."""
        try:
            if self.device.startswith("cuda"):
                memory.configure_allocator()
                memory.apply_memory_limit(self.device, self.settings.gpu_memory_limit)
            self.fp8 = speed.fp8_wanted(self.settings.fp8, self.device, self.dtype)
            self.usable_gib = memory.usable_gib(self.device)
            profile = memory.choose_profile(self.settings.memory_profile, self.usable_gib, self.fp8)
            if pipe is None:
                pipe = loading.load_pipeline(self.settings, build_device=self.device if profile == "full" else "cpu")
            pipe.set_progress_bar_config(disable=True)
            self.placement = memory.Placement(pipe, self.device, memory.profile_spec(profile, self.fp8), self.fp8)
            self.placement.place()  # fp8 quantization happens here, before any compile (order matters)
            self.attention_backend = speed.choose_attention_backend(self.settings.attention, self.device)
            speed.apply_attention_backend(pipe.transformer, self.attention_backend)
            if self.settings.compile_enabled():
                speed.use_compile_cache(self.settings.cache_dir / "inductor")
                # Saved artifacts for exactly these settings go in before anything compiles (compile_cache.py).
                self._compile_cache = compile_cache.prepare(self.settings.cache_dir, compile_cache.engine_fields(self))
                if not self.placement.profile.transformer_streamed:  # offload hooks and compile do not mix
                    speed.compile_transformer(pipe.transformer)
                    self.compiled = True
                if not self.placement.profile.text_encoder_streamed:
                    speed.compile_text_encoder(pipe.text_encoder)
            self.speed_switches = speed.apply_switches(pipe, self.device, self.compiled, self.placement.profile.name)
            self.pipe = pipe
        except Exception as exc:
            self.state, self.state_detail = "failed", str(exc)
            raise
        self.state = "warming"
        log.info("engine loaded: %s", self.describe())

    def mark_ready(self, warm_shapes: list[dict] | None = None) -> None:
        if self.state == "warming":
            self.warm_shapes = list(warm_shapes or [])
            # Compiled graphs leave ~10^6 long-lived objects; a full gc.collect() walking them took 0.5 s per
            # request on the H100 host (49 % of a Standard generation). Freezing them after warm-up keeps the
            # per-request collection to what the request itself created.
            compile_cache.store(getattr(self, "_compile_cache", None))  # after warm-up: what it compiled
            gc.collect()
            gc.freeze()
            self.state = "ready"
            log.info("engine ready")

    def describe(self) -> dict:
        return {
            "model": self.settings.model,
            "model_description": loading.describe(self.settings.model),
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "attention": self.attention_backend,
            "compiled": self.compiled,
            "speed_switches": getattr(self, "speed_switches", []),
            "fp8": self.fp8,
            "memory_profile": self.placement.profile.name if self.placement else None,
            "usable_gib": round(self.usable_gib, 1) if self.usable_gib else None,
        }

    @property
    def waiting(self) -> int:
        """Generations waiting for the GPU (not counting the one running)."""
        return self._gpu_lock.waiting

    # ---- requests --------------------------------------------------------------------------------
    def resolve(self, request: GenerationRequest) -> Job:
        """Validate a request (RequestError on mistakes) and add engine-specific warnings."""
        job = resolve(request)
        if self.placement is not None:
            tier = presets.TIERS.get(job.preset) or presets.tier_for_size(job.width, job.height)
            reason = memory.refusal(self.placement.profile.name, self.fp8, tier.name, self.usable_gib)
            if reason:
                raise RequestError(reason, "preset")
            if not job.vae_tiling and self.placement.tiled_decode(tier.name):
                job = dataclasses.replace(job, vae_tiling=True)
        if self.pipe is not None:
            n_tokens = self.count_prompt_tokens(job.prompt)
            job = dataclasses.replace(job, prompt_tokens=n_tokens)
            if n_tokens > MAX_SEQUENCE_LENGTH:
                job = dataclasses.replace(job, warnings=job.warnings + (
                    f"prompt is {n_tokens} tokens; only the first {MAX_SEQUENCE_LENGTH} were used",))
        return job

    def count_prompt_tokens(self, prompt: str) -> int:
        tok = self.pipe.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=True)
        return len(tok(text).input_ids)  # as the pipeline tokenizes it

    def generate(self, request: GenerationRequest | Job, *, on_progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None, allow_warming: bool = False,
                 return_latents: bool = False) -> GenerationResult:
        """Run one request. Thread-safe; concurrent callers wait for the GPU in turn.

        Raises RequestError (bad input), GenerationCancelled, OutOfMemory, EngineUnavailable.
        """
        self.check_available(allow_warming)
        job = request if isinstance(request, Job) else self.resolve(request)
        self.stats.max_waiting = max(self.stats.max_waiting, self._gpu_lock.waiting + 1)
        with self._gpu_lock:
            self.check_available(allow_warming)
            self.stats.inflight += 1
            started = time.perf_counter()
            try:
                result = self._run(job, on_progress or (lambda done, total: None), cancel or threading.Event(),
                                   return_latents)
                self.stats.completed += 1
                return result
            except GenerationCancelled:
                self.stats.cancelled += 1
                raise
            except Exception as exc:
                self.stats.failed += 1
                if _is_fatal_device_error(exc):
                    self._fatal(f"device error: {str(exc).splitlines()[0][:200]}")
                raise
            finally:
                self.stats.inflight -= 1
                if self.release_after_request:
                    memory.release_memory(self.device)
                log.debug("request done in %.3fs", time.perf_counter() - started)

    def check_available(self, allow_warming: bool = False) -> None:
        """Raise EngineUnavailable, saying why, unless the engine can take work now."""
        if self.state == "ready" or (allow_warming and self.state == "warming"):
            return
        if self.state == "warming":
            raise EngineUnavailable("the model is warming up; try again in a few seconds")
        if self.state == "loading":
            raise EngineUnavailable("the model is still loading; try again shortly")
        if self.state == "fatal":
            raise EngineUnavailable(f"the engine stopped after a fatal error ({self.state_detail}) and waits to be "
                                    "restarted; under supervisord that happens automatically")
        raise EngineUnavailable(f"the model failed to load: {self.state_detail}")

    # ---- the three stages ------------------------------------------------------------------------
    def _run(self, job: Job, on_progress: ProgressFn, cancel: threading.Event,
             return_latents: bool = False) -> GenerationResult:
        with self._concurrency_count:
            self._concurrent += 1
            self.stats.max_concurrent = max(self.stats.max_concurrent, self._concurrent)
        try:
            result = self._run_stages(job, on_progress, cancel, return_latents)
        finally:
            with self._concurrency_count:
                self._concurrent -= 1
        log.info("generated %s %dx%d steps=%d n=%d in %.2fs", job.preset, job.width, job.height, job.steps,
                 len(job.seeds), result.timings["total"])
        return result

    def _run_stages(self, job: Job, on_progress: ProgressFn, cancel: threading.Event,
                    return_latents: bool) -> GenerationResult:
        on_gpu = self.device.startswith("cuda")
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        timings = {"text_encode": 0.0, "denoise": 0.0, "decode": 0.0}
        warnings, recoveries = list(job.warnings), []
        total_steps = job.steps * len(job.seeds)
        t_start = time.perf_counter()

        def timed(stage: str, fn):
            t0 = time.perf_counter()
            out = fn()
            self._sync()
            timings[stage] += time.perf_counter() - t0
            return out

        def check_cancel():
            if cancel.is_set():
                raise GenerationCancelled("cancelled")

        with torch.no_grad():
            check_cancel()
            embeds = timed("text_encode", lambda: self._with_oom_retry(
                "text_encode", job, lambda: self._encode(job.prompt, job.prompt_tokens),
                lambda: self._encode(job.prompt, job.prompt_tokens, shed=True), "text encoder on CPU", recoveries))
            images, kept_latents = [], []
            for index, seed in enumerate(job.seeds):
                check_cancel()
                offset = index * job.steps
                latents = timed("denoise", lambda: self._with_oom_retry(
                    "denoise", job, lambda: self._denoise(job, embeds, seed, offset, total_steps, on_progress, cancel),
                    lambda: self._denoise(job, embeds, seed, offset, total_steps, on_progress, cancel, shed=True),
                    "text encoder moved off the GPU", recoveries))
                check_cancel()
                if not bool(torch.isfinite(latents).all()):
                    warnings.append(f"image {index + 1} (seed {seed}) has non-finite latents; it will look wrong")
                if return_latents:
                    kept_latents.append(latents.float().cpu())
                tiled = job.vae_tiling or not memory.fits_untiled_decode(self.device, job.width, job.height)
                images.append(timed("decode", lambda: self._with_oom_retry(
                    "decode", job, lambda: self._decode(latents, tiled=tiled),
                    lambda: self._decode(latents, tiled=True), "tiled VAE decode", recoveries)))
                del latents
        timings = {k: round(v, 4) for k, v in timings.items()}
        timings["total"] = round(time.perf_counter() - t_start, 4)
        peak = torch.cuda.max_memory_allocated(self.device) if on_gpu else None
        self.stats.last_peak_vram_bytes = peak
        warnings += [f"ran out of GPU memory in {r}; recovered" for r in recoveries]
        return GenerationResult(images=images, seeds=list(job.seeds), prompt=job.prompt, preset=job.preset,
                                width=job.width, height=job.height, steps=job.steps, timings=timings,
                                peak_vram_bytes=peak, warnings=warnings, oom_retries=len(recoveries),
                                latents=kept_latents or None)

    def _encode(self, prompt: str, n_tokens: int | None = None, shed: bool = False) -> list[torch.Tensor]:
        cached = self._embed_cache.get(prompt)
        if cached is not None:
            self._embed_cache.move_to_end(prompt)
            return cached
        if shed:
            self.placement.shed_text_encoder()
        else:
            self.placement.before_encode()
        length = encode_length(n_tokens or self.count_prompt_tokens(prompt))
        embeds, _ = self.pipe.encode_prompt(prompt, device=self.placement.text_encoder_device,
                                            do_classifier_free_guidance=False, max_sequence_length=length)
        embeds = [e.to(self.device) for e in embeds]
        if self.settings.embed_cache > 0:
            self._embed_cache[prompt] = embeds
            while len(self._embed_cache) > self.settings.embed_cache:
                self._embed_cache.popitem(last=False)
        return embeds

    def _denoise(self, job: Job, embeds, seed: int, offset: int, total: int, on_progress: ProgressFn,
                 cancel: threading.Event, shed: bool = False) -> torch.Tensor:
        if shed:
            self.placement.shed_text_encoder()

        def on_step_end(pipe, step, timestep, tensors):
            on_progress(offset + step + 1, total)
            if cancel.is_set():
                pipe._interrupt = True  # diffusers skips the remaining steps
            return tensors

        # CPU generator: the same seed gives the same noise on any GPU or on CPU.
        out = self.pipe(prompt_embeds=embeds, height=job.height, width=job.width, num_inference_steps=job.steps,
                        guidance_scale=presets.GUIDANCE_SCALE, generator=torch.Generator("cpu").manual_seed(seed),
                        output_type="latent", callback_on_step_end=on_step_end,
                        max_sequence_length=MAX_SEQUENCE_LENGTH)
        return out.images

    def _decode(self, latents: torch.Tensor, tiled: bool) -> PIL.Image.Image:
        vae = self.pipe.vae
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        if tiled:
            vae.enable_tiling()
        try:
            decoded = vae.decode(scaled, return_dict=False)[0]
        finally:
            if tiled:
                vae.disable_tiling()
        # To uint8 on the device: 4x fewer bytes to copy than float32 (same formula as VaeImageProcessor).
        if not bool(torch.isfinite(decoded).all()):
            log.warning("non-finite pixels decoded (shown as black)")
            self.stats.nonfinite_images += 1
        pixels = ((decoded[0].float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return PIL.Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy()))

    # ---- out of memory, fatal errors -------------------------------------------------------------
    def _with_oom_retry(self, stage: str, job: Job, run, fallback, fallback_label: str, recoveries: list):
        try:
            return run()
        except torch.OutOfMemoryError:
            self._note_oom("handled", stage, job, f"retry with {fallback_label}")
        # Outside the except block: the traceback's frames (and their tensors) are gone before we retry.
        memory.release_memory(self.device)
        try:
            result = fallback()
        except torch.OutOfMemoryError:
            self._note_oom("failed", stage, job, "giving up")
            memory.release_memory(self.device)
            raise OutOfMemory(self._oom_message(stage, job), stage) from None
        recoveries.append(f"{stage} ({fallback_label})")
        return result

    def _note_oom(self, kind: str, stage: str, job: Job, action: str) -> None:
        self.stats.oom[kind] += 1
        free_total = memory.gpu_memory(self.device)
        mem = (f" free={free_total[0] / memory.GIB:.1f}GiB total={free_total[1] / memory.GIB:.1f}GiB"
               if free_total else "")
        log.warning("oom handled stage=%s size=%dx%d steps=%d images=%d%s action=%s", stage, job.width, job.height,
                    job.steps, len(job.seeds), mem, action)
        if kind != "handled":
            return  # the fatal window counts OOMs hit, not the retries that failed after them
        now = time.monotonic()
        self._oom_times.append(now)
        while self._oom_times and now - self._oom_times[0] > self.settings.oom_fatal_window:
            self._oom_times.popleft()
        if len(self._oom_times) >= self.settings.oom_fatal_count:
            self._fatal(f"{len(self._oom_times)} out-of-memory errors within {self.settings.oom_fatal_window:g}s",
                        oom=True)

    def _oom_message(self, stage: str, job: Job) -> str:
        free_total = memory.gpu_memory(self.device)
        mem = (f"{free_total[0] / memory.GIB:.1f} GiB free of {free_total[1] / memory.GIB:.1f} GiB"
               if free_total else "memory exhausted")
        smaller = [t for t in presets.TIERS.values() if t.area < job.width * job.height]
        hint = (f"try the {smaller[-1].name} preset" if smaller else "try a smaller size")
        if len(job.seeds) > 1:
            hint += " or fewer images"
        return (f"out of GPU memory in {stage} for {job.width}x{job.height} ({job.preset}) even after a "
                f"lower-memory retry; {mem}. {hint[0].upper() + hint[1:]}.")

    def _fatal(self, reason: str, oom: bool = False) -> None:
        if self.state != "fatal":
            if oom:
                self.stats.oom["fatal"] += 1
            self.state, self.state_detail = "fatal", reason
            log.error("fatal: %s; this process should be restarted", reason)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)


def _is_fatal_device_error(exc: BaseException) -> bool:
    """A CUDA error other than OOM leaves the context unusable (illegal address, ECC, launch failure)."""
    if isinstance(exc, (torch.OutOfMemoryError, OutOfMemory, RequestError, GenerationCancelled)):
        return False
    return isinstance(exc, torch.AcceleratorError) or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc))
