"""The engine: prompt in, images out, one generation at a time per GPU, memory given back after each.

It knows the model and the GPU and nothing of Gradio or HTTP, and offers the interface in interface.py
(status, resolve, generate, describe). Front ends call `generate()` from any thread; a FIFO lock serialises
the GPU work. The stages (encode, denoise, decode) and their out-of-memory ladder are in stages.py; this
module owns the life cycle (loading -> warming -> ready; failed; fatal), the lock, counters, the fatal
rules and the per-request memory release.

Log lines the supervision monitor reads (keep them stable):
    "oom handled stage=<stage> ..."   an OOM that the engine recovered from or reported to the caller
    "fatal: <reason>"                 the process should be restarted (CUDA error, or too many OOMs)
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import compile_cache, cudagraph, loading, lora, memory, speed, warmup
from .interface import EngineState, EngineStatus, ProgressFn, start_in_background
from .request import (GenerationCancelled, GenerationRequest, GenerationResult, Job,
                      OutOfMemory, RequestError, check_lora_limit, resolve)
from .settings import Settings
from .stages import MAX_SEQUENCE_LENGTH, Stages, count_prompt_tokens, memory_note

log = logging.getLogger("zimage.engine")


class FifoLock:
    """A lock granted in arrival order. threading.Lock is not fair: with the UI worker and API threads all
    waiting for the GPU, a caller could be overtaken again and again. `waiting` feeds the queue-depth gauge."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._arrivals: collections.deque[object] = collections.deque()
        self._held = False

    def acquire(self, cancel: threading.Event | None = None) -> None:
        """Wait for our turn; a `cancel` set while waiting leaves the line and raises GenerationCancelled."""
        ticket = object()
        with self._cond:
            self._arrivals.append(ticket)
            while self._held or self._arrivals[0] is not ticket:
                if cancel is not None and cancel.is_set():
                    self._arrivals.remove(ticket)
                    self._cond.notify_all()
                    raise GenerationCancelled("cancelled while waiting for the GPU")
                self._cond.wait(timeout=0.25 if cancel is not None else None)
            self._arrivals.popleft()
            self._held = True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def __enter__(self) -> "FifoLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

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
    """Owns the pipeline. States (interface.EngineState): loading -> warming -> ready; failed if loading or
    warm-up failed; fatal after a fatal error (then it refuses work until the process is restarted)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = settings.torch_device()
        self.dtype = settings.torch_dtype()
        self.stats = EngineStats()
        self.stages: Stages | None = None  # set by load(); tests instrument it
        self.placement: memory.Placement | None = None
        self.attention_backend = "native"
        self.usable_gib: float | None = None
        self.fp8 = False
        self.compiled = False
        self.speed_switches: list[str] = []  # speed.apply_switches: what else was switched on (VAE compile, ...)
        self._compile_cache = None  # compile_cache.prepare's handle: saved compiled artifacts for these settings
        # Cache release after every request (gc + empty_cache). Off only to measure what it costs. Its collection
        # runs while the host waits for the request's last kernels (Stages.while_waiting), off the caller's time.
        self.release_after_request = True
        self._collected = False  # this request's collection ran while waiting for the GPU
        self._state, self._detail = EngineState.LOADING, ""
        self._warm_report: tuple[dict, ...] = ()
        self._frozen_mark: tuple[int, int] | None = None  # graphs compiled/captured at the last gc.freeze
        self._gpu_lock = FifoLock()
        self._concurrency_count = threading.Lock()
        self._concurrent = 0
        self._oom_times: collections.deque[float] = collections.deque()
        # LoRAs (lora.py): the folder is read from the start (listing); slots go on the transformer at load.
        self.lora_library = lora.LoraLibrary(settings.lora_dir)
        self.loras: lora.LoraRuntime | None = None
        self.lora_reserve_gib = 0.0  # GPU memory LoRA slots and cache take beside the model
        self.lora_mode = settings.lora_mode  # auto is decided at load (_choose_lora_mode)

    # ---- the interface (interface.ImageEngine) ---------------------------------------------------
    def status(self) -> EngineStatus:
        return EngineStatus(self._state, self._detail, loaded=self.stages is not None, warm=self._warm_report)

    def describe(self) -> dict:
        return {
            "model": self.settings.model,
            "model_description": loading.describe(self.settings.model),
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "attention": self.attention_backend,
            "compiled": self.compiled,
            "speed_switches": self.speed_switches,
            "fp8": self.fp8,
            "memory_profile": self.placement.profile.name if self.placement else None,
            "usable_gib": round(self.usable_gib, 1) if self.usable_gib else None,
            "lora": self.loras.describe() if self.loras else None,
        }

    def list_loras(self) -> list[dict]:
        """Every file of the LoRA folder: name, rank, size, layers, whether it loads (and why not), whether it
        is on the device now. Rescans the folder."""
        loaded = self.loras.loaded_names() if self.loras else set()
        return [info.as_dict(loaded=info.name in loaded) for info in self.lora_library.listing()]

    def resolve(self, request: GenerationRequest) -> Job:
        """Validate a request (RequestError on mistakes), decide its memory plan, count its prompt tokens."""
        return self.plan(resolve(request))

    def plan(self, job: Job) -> Job:
        """The engine's part of resolve: the LoRA checks, the memory refusal and plan, the prompt's token count.
        A Ray replica (replicas.py) applies it to a job its ingress validated with request.resolve."""
        if job.loras:
            check_lora_limit(job, self.settings.max_loras if self.settings.loras_enabled() else 0)
            if self.loras is not None:
                self.loras.check(job.loras)  # each name a usable file of the folder, ranks fit the slots
        if self.placement is not None:
            reason = memory.refusal(self.placement.profile.name, self.fp8, job.tier, self.usable_gib,
                                    self.lora_reserve_gib)
            if reason:
                raise RequestError(reason, "preset")
            job = dataclasses.replace(job, vae_tiling=self.placement.plan_tiled_decode(job.tier))
        if self.stages is not None:
            n_tokens = self.count_prompt_tokens(job.prompt)
            job = dataclasses.replace(job, prompt_tokens=n_tokens)
            if n_tokens > MAX_SEQUENCE_LENGTH:
                job = dataclasses.replace(job, warnings=job.warnings + (
                    f"prompt is {n_tokens} tokens; only the first {MAX_SEQUENCE_LENGTH} were used",))
        return job

    def generate(self, job: Job, on_progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Run one resolved job. Thread-safe; concurrent callers wait for the GPU in arrival order.

        Raises GenerationCancelled, OutOfMemory, EngineUnavailable (and RequestError only from resolve).
        """
        return self._generate(job, on_progress, cancel, allow_warming=False)

    # ---- life cycle ------------------------------------------------------------------------------
    @classmethod
    def create(cls, settings: Settings) -> "Engine":
        """Load and configure in one call (tests, CLI one-liners, benchmarks)."""
        engine = cls(settings)
        engine.load()
        return engine

    def load(self, pipe=None) -> None:
        """Load the model (or adopt `pipe`), place it for the memory profile, apply the speed switches."""
        phases, t0 = {}, time.perf_counter()  # seconds per loading phase, for the log (restart time)

        def phase(name: str) -> None:
            nonlocal t0
            phases[name] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()

        try:
            if self.device.startswith("cuda"):
                memory.configure_allocator()
                memory.apply_memory_limit(self.device, self.settings.gpu_memory_limit)
            self.fp8 = speed.fp8_wanted(self.settings.fp8, self.device, self.dtype)
            self.usable_gib = memory.usable_gib(self.device)
            self.lora_mode = self._choose_lora_mode()
            lora_gib = (lora.reserve_gib(self.settings.lora_rank, self.lora_mode, self.fp8)
                        if self.settings.loras_enabled() else 0.0)
            profile = memory.choose_profile(self.settings.memory_profile, self.usable_gib, self.fp8, lora_gib)
            if pipe is None:
                pipe = loading.load_pipeline(self.settings, build_device=self.device if profile == "full" else "cpu")
            pipe.set_progress_bar_config(disable=True)
            phase("model")
            self.placement = memory.Placement(pipe, self.device, memory.profile_spec(profile, self.fp8), self.fp8)
            self.placement.place()  # fp8 quantization happens here, before any compile (order matters)
            phase("placement")
            self.attention_backend = speed.choose_attention_backend(self.settings.attention, self.device)
            speed.apply_attention_backend(pipe.transformer, self.attention_backend)
            # After fp8 quantization (the fused weights are the quantized ones), before LoRA slots and compile.
            fused = speed.fuse_projections(pipe.transformer, resident=not self.placement.profile.transformer_streamed)
            if self.settings.loras_enabled():  # slots on every Linear: after fp8 quantization, before compile
                self._install_loras(pipe.transformer, profile)
            if self.settings.compile_enabled():
                speed.use_compile_cache(self.settings.cache_dir / "inductor")
                # Saved artifacts for exactly these settings go in before anything compiles (compile_cache.py).
                self._compile_cache = compile_cache.prepare(self.settings.cache_dir, compile_cache.engine_fields(self),
                                                            precompile=speed.switches().precompile)
                if not self.placement.profile.transformer_streamed:  # offload hooks and compile do not mix
                    speed.compile_transformer(pipe.transformer)
                    self.compiled = True
                if not self.placement.profile.text_encoder_streamed:
                    speed.compile_text_encoder(pipe.text_encoder)
            encoder_compiled = self.settings.compile_enabled() and not self.placement.profile.text_encoder_streamed
            decode_graph_room = memory.room_for_decode_graphs(self.usable_gib, self.fp8, self.lora_reserve_gib)
            self.speed_switches = speed.apply_switches(pipe, self.device, self.compiled, self.placement.profile.name,
                                                       encoder_compiled=encoder_compiled, fused=bool(fused),
                                                       decode_graph_room=decode_graph_room,
                                                       streamed=self.placement.profile.transformer_streamed)
            if fused:
                from . import fusion  # imports diffusers, as loading did by now

                fusion.check(pipe.transformer)  # nothing since fusing moved or re-quantized the weights
                self.speed_switches.insert(0, "fused_projections")
            self.stages = Stages(pipe, self.placement, self.device, self.settings.embed_cache, self._note_oom,
                                 self.stats)
            self.stages.overlap = speed.switches().overlap_stages
            self.stages.while_waiting = self._collect_while_waiting
            if self.stages.overlap and self.device.startswith("cuda"):
                self.speed_switches.append("overlap_stages")
            phase("loras, compile set-up")
        except Exception as exc:
            self.mark_failed(str(exc))
            raise
        self._state = EngineState.WARMING
        log.info("engine loaded (seconds: %s): %s", phases, self.describe())

    def _choose_lora_mode(self) -> str:
        """--lora-mode auto: merge (no per-step cost; H100 fp8: -0.6 % vs +21.5 % per step for branch) where the
        transformer stays resident and its weight copy fits beside every tier of the full profile; else branch
        (any profile, and the CPU, where the tests pin each mode explicitly)."""
        setting = self.settings.lora_mode
        if setting != "auto":
            return setting
        if self.usable_gib is None or self.settings.memory_profile not in ("auto", "full"):
            return "branch"
        merge_gib = lora.reserve_gib(self.settings.lora_rank, "merge", self.fp8)
        fits = all(memory.refusal("full", self.fp8, tier, self.usable_gib, merge_gib) is None
                   for tier in memory.EXPECTED_PEAK_GIB[("full", self.fp8)])
        return "merge" if fits else "branch"

    def _install_loras(self, transformer, profile: str) -> None:
        """LoRA slots on the transformer (or merge mode's copy of its weights), and the device cache's budget: the
        setting, or what the profile leaves free beside its largest tier, so the 16gb and 12gb profiles keep
        their margins. Refusals then count what LoRAs hold resident (`lora_reserve_gib`); the cache always fits
        beside the largest tier, so it never causes one."""
        mode = self.lora_mode
        if mode == "merge" and self.placement.profile.transformer_streamed:
            raise RuntimeError("--lora-mode merge needs the transformer resident on the GPU (memory profile full "
                               "or 16gb); use --lora-mode branch with this memory profile")
        self.loras = lora.LoraRuntime(self.lora_library, transformer, self.device, self.dtype,
                                      self.settings.lora_rank, 0, mode=mode)
        resident = self.loras.resident_bytes() / 2**30
        cache_mib = float(self.settings.lora_cache_mib)
        if self.usable_gib is not None:
            room = (self.usable_gib - memory.HEADROOM_GIB - resident
                    - max(memory.EXPECTED_PEAK_GIB[(profile, self.fp8)].values()))
            if room < 0 and mode == "merge":
                self.loras = None
                raise RuntimeError(f"--lora-mode merge needs {resident:.1f} GiB beside the model and this GPU has "
                                   f"{room + resident:.1f} GiB to spare with the {profile} profile: use --lora-mode "
                                   "branch")
            cache_mib = max(0.0, min(cache_mib, room * 1024))
            self.lora_reserve_gib = resident
        self.loras.cache_bytes = int(cache_mib * 2**20)

    def start(self) -> None:
        """Load, then warm up (or mark ready): what the service runs at start-up."""
        try:
            self.load()
            if self.settings.warmup_enabled():
                self.warm_up()
            else:
                self.mark_ready()
        except Exception:
            self._forget_precompiled()
            raise

    def _forget_precompiled(self) -> None:
        """A failed start with Dynamo's precompile cache on: drop the saved packages, so the restart the
        supervisor makes traces as usual instead of failing the same way (torch 2.11 raised a TypeError while
        loading its own packages; compile_cache.use_precompile)."""
        if self._compile_cache is not None:
            compile_cache.forget_precompiled(self._compile_cache)

    def start_in_background(self, on_failure: Callable[[BaseException], None]) -> threading.Thread:
        return start_in_background(self.start, self.mark_failed, on_failure)

    def warm_up(self, shapes: list[warmup.Shape] | None = None) -> list[dict]:
        """One generation per shape the service will serve (warmup.shapes_to_warm by default), then ready.
        Returns seconds per shape (also in status().warm). A compiled engine whose LoRA folder holds LoRAs also
        runs its first two shapes through the LoRA branch (zero weights), so a first LoRA request compiles nothing."""
        report = []
        shapes = shapes if shapes is not None else warmup.shapes_to_warm(self.compiled)
        runs = [(request, False) for request in warmup.requests(shapes)]
        if (self.loras is not None and self.loras.mode == "branch" and self.compiled
                and any(i.ok for i in self.lora_library.listing())):
            runs += [(dataclasses.replace(request, steps=1), True) for request in warmup.requests(shapes[:2])]
        for request, with_lora in runs:
            t0 = time.perf_counter()
            if with_lora:
                with self.loras.warming():
                    result = self._generate(self.resolve(request), None, None, allow_warming=True)
            else:
                result = self._generate(self.resolve(request), None, None, allow_warming=True)
            entry = {"preset": request.preset, "aspect": request.aspect, "width": result.width,
                     "height": result.height, "steps": result.steps, "seconds": round(time.perf_counter() - t0, 3)}
            if with_lora:
                entry["lora_branch"] = True
            report.append(entry)  # (_generate froze what this shape compiled)
            log.info("warm-up %s %s %dx%d%s: %.2fs", request.preset, request.aspect, result.width, result.height,
                     " (LoRA branch)" if with_lora else "", entry["seconds"])
        if self.settings.compile_enabled():
            log.info("warm-up compile time by phase (s): %s", warmup.compile_seconds(detail_over=0.5))
        self.mark_ready(report)
        return report

    def mark_ready(self, warm_report: list[dict] | None = None) -> None:
        if self._state is EngineState.WARMING:
            self._warm_report = tuple(warm_report or ())
            compile_cache.store(self._compile_cache)  # after warm-up: what it compiled
            self._freeze_what_compiled(always=True)  # and everything loaded
            self._state = EngineState.READY
            log.info("engine ready")

    def _freeze_what_compiled(self, always: bool = False) -> None:
        """Compiling and capturing CUDA graphs leave long-lived objects (~10^6 for the full model); a full
        gc.collect() that walks them again after every request took 0.5 s per request on the H100 host (49 % of a
        Standard generation). So they are frozen (gc.freeze) once made: at ready, and after any generation --
        warm-up's, or a request's at a shape warm-up never ran -- that compiled or captured a new graph. Call it
        right after a full collection: a frozen object is still freed by its reference count, but cyclic garbage
        frozen with it would stay: so it collects first."""
        dynamo = sys.modules.get("torch._dynamo.utils")  # not imported: nothing compiled (importing it costs ~1 s)
        mark = (dynamo.counters["stats"]["unique_graphs"] if dynamo else 0, cudagraph.captures_total())
        if always or mark != self._frozen_mark:
            gc.collect()
            gc.freeze()
            self._frozen_mark = mark

    def mark_failed(self, reason: str) -> None:
        """Loading or warm-up failed: refuse work, report why (the server then exits)."""
        self._state, self._detail = EngineState.FAILED, reason

    def close(self) -> None:
        """Drop the pipeline (benchmarks that build several engines in one process). mark_ready froze the garbage
        collector's view of everything loaded so far (gc.freeze); unfrozen here, or the reference cycles of the
        compiled blocks would keep this engine's weights on the GPU for the rest of the process."""
        self.stages = self.placement = self.loras = None
        self._state, self._detail = EngineState.FAILED, "closed"
        gc.unfreeze()
        memory.release_memory(self.device)

    @property
    def pipeline(self):
        """The loaded diffusers pipeline, for instrumentation only (tests' fault injection, profilers)."""
        return self.stages.pipe if self.stages is not None else None

    @property
    def waiting(self) -> int:
        """Generations waiting for the GPU (not counting the one running)."""
        return self._gpu_lock.waiting

    def count_prompt_tokens(self, prompt: str) -> int:
        return count_prompt_tokens(self.stages.pipe.tokenizer, prompt)

    # ---- running a job ---------------------------------------------------------------------------
    def _generate(self, job: Job, on_progress: ProgressFn | None, cancel: threading.Event | None,
                  allow_warming: bool) -> GenerationResult:
        self._check_available(allow_warming)
        cancel = cancel or threading.Event()
        self.stats.max_waiting = max(self.stats.max_waiting, self._gpu_lock.waiting + 1)
        self._gpu_lock.acquire(cancel)
        try:
            self._check_available(allow_warming)
            self.stats.inflight += 1
            started = time.perf_counter()
            try:
                result = self._run(job, on_progress or (lambda done, total: None), cancel)
                self.stats.completed += 1
                self.stats.last_peak_vram_bytes = result.peak_vram_bytes
                return result
            except GenerationCancelled:
                self.stats.cancelled += 1
                log.info("cancelled %s %dx%d steps=%d n=%d after %.2fs", job.preset, job.width, job.height,
                         job.steps, len(job.seeds), time.perf_counter() - started)
                raise
            except Exception as exc:
                self.stats.failed += 1
                if _is_fatal_device_error(exc):
                    self._fatal(f"device error: {str(exc).splitlines()[0][:200]}")
                raise
            finally:
                self.stats.inflight -= 1
                if self.release_after_request:
                    memory.release_memory(self.device, collect=not self._collected)
                    self._freeze_what_compiled()
                self._collected = False
                log.debug("request done in %.3fs", time.perf_counter() - started)
        finally:
            self._gpu_lock.release()

    def _collect_while_waiting(self) -> None:
        """The per-request collection, run while the host would only wait for the GPU. Small either way: a Standard
        request's cleanup (wall minus the stages, resolve included) was 2.1 ms with the collection after the request
        and 2.2 ms with it here (H100, 2026-12-07, different machines); the rest is empty_cache and the tokenizer."""
        if self.release_after_request:
            gc.collect()
            self._collected = True

    def _check_available(self, allow_warming: bool) -> None:
        self.status().check(allow_warming)

    def _run(self, job: Job, on_progress: ProgressFn, cancel: threading.Event) -> GenerationResult:
        with self._concurrency_count:
            self._concurrent += 1
            self.stats.max_concurrent = max(self.stats.max_concurrent, self._concurrent)
        try:
            applied, lora_seconds = [], None
            if self.loras is not None:  # under the GPU lock: this job's LoRAs and nobody else's
                t0 = time.perf_counter()
                applied = self._apply_loras(job)
                lora_seconds = time.perf_counter() - t0
            result = self.stages.run(job, on_progress, cancel)
            result.loras = applied
            if job.loras and lora_seconds is not None:
                result.timings["lora"] = round(lora_seconds, 4)
        finally:
            with self._concurrency_count:
                self._concurrent -= 1
        log.info("generated %s %dx%d steps=%d n=%d in %.2fs", job.preset, job.width, job.height, job.steps,
                 len(job.seeds), result.timings["total"])
        return result

    def _apply_loras(self, job: Job) -> list[dict]:
        """This job's LoRAs into the transformer; out of memory (reading a LoRA onto the GPU) frees the LoRA cache
        and tries once more, then says so."""
        for attempt in (1, 2):
            try:
                return self.loras.apply(job.loras)
            except lora.LoraError as exc:
                raise RequestError(str(exc), "loras") from None
            except torch.OutOfMemoryError:
                self._note_oom("handled" if attempt == 1 else "failed", "lora", job,
                               "retry with the LoRA cache emptied" if attempt == 1 else "giving up")
            self.loras.drop_cache()
            memory.release_memory(self.device)
        raise OutOfMemory(f"out of GPU memory loading the LoRAs {', '.join(s.name for s in job.loras)}; "
                          f"{memory_note(self.device, '{free:.1f} GiB free of {total:.1f} GiB', 'memory exhausted')}. "
                          "Try fewer or smaller LoRAs.", "lora")

    # ---- out of memory, fatal errors -------------------------------------------------------------
    def _note_oom(self, kind: str, stage: str, job: Job, action: str) -> None:
        self.stats.oom[kind] += 1
        mem = memory_note(self.device, " free={free:.1f}GiB total={total:.1f}GiB", "")
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

    def _fatal(self, reason: str, oom: bool = False) -> None:
        if self._state is not EngineState.FATAL:
            if oom:
                self.stats.oom["fatal"] += 1
            self._state, self._detail = EngineState.FATAL, reason
            log.error("fatal: %s; this process should be restarted", reason)


def _is_fatal_device_error(exc: BaseException) -> bool:
    """A CUDA error other than OOM leaves the context unusable (illegal address, ECC, launch failure)."""
    if isinstance(exc, (torch.OutOfMemoryError, OutOfMemory, RequestError, GenerationCancelled)):
        return False
    return isinstance(exc, torch.AcceleratorError) or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc))
