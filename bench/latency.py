"""Latency benchmark of the project's engine: presets x speed settings, per stage, against the FLOP floor.

    python bench/latency.py --model random-full --variants eager+native,compiled+cudnn,compiled+cudnn+fp8 \
        --shapes Standard:1:1,Draft:1:1 --runs 10 --out latency.json

A variant is '+'-joined tokens:
    eager | compiled (the engine's own regional compile) | compiled-dyn (dynamic=True) | compiled-mat
        (max-autotune-no-cudagraphs)
    native | cudnn | flash | efficient | fa3 | fa2     attention backend (diffusers names _native_cudnn, ...)
    fa4        FlashAttention-4 through the project's processor (zimage/fastattn.py)
    rope / norope, vaec / novaec, cg / nocg, encg / noencg, gn / nogn, fuse / nofuse, kern / nokern, bk / nobk,
    sg / nosg, dg / nodg, fa8 / nofa8, fg / nofg, vga / novga, os, co, lt, c8    speed switches (zimage/speed.py Switches:
               real_rope, vae_compile, block_graphs, encoder_graphs, vae_split_norm, fused_projections,
               fused_kernels, block_kernels, step_graphs, decode_graphs, fp8_attention, fused_gemms,
               vae_gemm_attention, overlap_stages, caption_once, lt_gemms, cudnn_fp8_attention); unnamed
               switches keep their defaults
               (ZIMAGE_SPEED for the process)
    fp8        fp8 rowwise transformer (zimage/fp8.py) (embedders, final layer, adaLN kept bf16)
    tec        compile the text encoder's layers too (regional); teg: the same with CUDA graphs
    nocleanup  skip the per-request cache release (to measure what it costs)
    i2i | inpaint    an edit instead of text-to-image: image-to-image at strength 0.6 / inpainting (centre
               quarter, strength 1.0) of a fixed input at the shape's size; first_task_call_s is the first
               edit after the text-to-image warm-up (what the first edit of a service costs); s0.6 etc.
               sets the edit's strength
    @S;S       after the tokens: this variant's own shapes instead of --shapes, e.g. compiled+fp8@Standard:1:1
Each variant gets a fresh engine. Per shape: the first call (compile included), then --runs timed runs.
FLOPs are counted once per shape (torch.utils.flop_counter, compiled code forced eager) and turned into
achieved TFLOP/s and the floor at the measured bf16 matmul peak. Prints a table; writes JSON as it goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from zimage import cudagraph, images, speed  # noqa: E402
from zimage.engine import Engine  # noqa: E402
from zimage.presets import ASPECTS, TIERS  # noqa: E402
from zimage.request import GenerationRequest, edit_steps  # noqa: E402
from zimage.settings import Settings  # noqa: E402

# ~254 tokens with the tiny BPE tokenizer random-full uses, like the 254-token prompt of the references.
PROMPT = ("A cinematic photograph of a young woman in a red Hanfu with intricate gold embroidery, holding a round "
          "folding fan, standing in front of the Big Wild Goose Pagoda at night, neon lightning-bolt lamp glowing "
          "above her left palm, soft bokeh city lights, shallow depth of field, 85mm lens, f/1.4, ultra detailed skin "
          "texture, volumetric light, rain puddles reflecting signs, 8k")
BF16_PEAK_TFLOPS = 798.0  # 8192^3 bf16 matmul measured on the device H100 (docs/PERFORMANCE.md)
ATTENTION = {"native": "native", "cudnn": "_native_cudnn", "flash": "_native_flash", "efficient": "_native_efficient",
             "fa3": "_flash_3", "fa2": "flash", "fa4": "fa4"}
SWITCH_TOKENS = {"rope": "real_rope", "vaec": "vae_compile", "cg": "block_graphs", "encg": "encoder_graphs",
                 "gn": "vae_split_norm", "fuse": "fused_projections", "kern": "fused_kernels",
                 "bk": "block_kernels", "sg": "step_graphs", "dg": "decode_graphs", "fa8": "fp8_attention",
                 "fg": "fused_gemms", "vga": "vae_gemm_attention", "os": "overlap_stages",
                 "co": "caption_once", "lt": "lt_gemms", "c8": "cudnn_fp8_attention"}


def parse_variant(spec: str) -> dict:
    spec, _, shapes = spec.partition("@")
    tokens = spec.split("+")
    v = {"name": spec, "shapes": shapes.replace(";", ",") or None, "compile": None, "attention": "native", "fp8": False,
         "tec": False, "cleanup": True, "switches": [], "task": None, "strength": None}
    for tok in tokens:
        if tok in ("eager", "compiled", "compiled-dyn", "compiled-mat"):
            v["compile"] = None if tok == "eager" else tok
        elif tok in ATTENTION:
            v["attention"] = ATTENTION[tok]
        elif tok == "fp8":
            v["fp8"] = True
        elif tok in ("tec", "teg"):
            v["tec"] = tok
        elif tok == "nocleanup":
            v["cleanup"] = False
        elif tok in ("i2i", "inpaint"):
            v["task"] = tok
        elif tok.startswith("s") and tok[1:].replace(".", "", 1).isdigit():
            v["strength"] = float(tok[1:])
        elif tok in SWITCH_TOKENS:
            v["switches"].append("+" + SWITCH_TOKENS[tok])
        elif tok.startswith("no") and tok[2:] in SWITCH_TOKENS:
            v["switches"].append("-" + SWITCH_TOKENS[tok[2:]])
        else:
            raise SystemExit(f"unknown variant token {tok!r} in {spec!r}")
    return v


def make_engine(args, v) -> tuple[Engine, float]:
    settings = Settings(model=args.model, device=args.device, attention=v["attention"],
                        compile="on" if v["compile"] == "compiled" else "off", fp8="on" if v["fp8"] else "off",
                        memory_profile="full", embed_cache=0, warmup="off", cache_dir=Path(args.cache_dir))
    base = os.environ.setdefault("ZIMAGE_SPEED_BASE", os.environ.get("ZIMAGE_SPEED", ""))
    os.environ["ZIMAGE_SPEED"] = ",".join(filter(None, [base, *v["switches"]]))
    t0 = time.perf_counter()
    engine = Engine.create(settings)
    if v["compile"] in ("compiled-dyn", "compiled-mat"):
        speed.use_compile_cache(settings.cache_dir / "inductor")
        speed.compile_transformer(engine.pipeline.transformer, dynamic=True if v["compile"] == "compiled-dyn" else None,
                                  mode="max-autotune-no-cudagraphs" if v["compile"] == "compiled-mat" else None)
        engine.compiled = True
    if v["tec"] == "teg" or (v["tec"] and not settings.compile_enabled()):  # the engine compiles it when on
        speed.compile_text_encoder(engine.pipeline.text_encoder, mode="reduce-overhead" if v["tec"] == "teg" else None)
    engine.release_after_request = v["cleanup"]
    return engine, time.perf_counter() - t0  # still warming: mark_ready after the first calls, as the app does


def request_for(v: dict, tier: str, aspect: str, seed: int) -> GenerationRequest:
    if v["task"] is None:
        return GenerationRequest(PROMPT, preset=tier, aspect=aspect, seed=seed)
    from PIL import Image, ImageDraw

    from zimage.presets import preset_size

    width, height = preset_size(tier, aspect)
    grid = np.add.outer(np.linspace(0, 255, height), np.linspace(0, 255, width)) / 2
    init = Image.fromarray(np.stack([grid, grid[::-1], 255 - grid], axis=-1).astype(np.uint8))
    if v["task"] == "i2i":
        return GenerationRequest(PROMPT, preset=tier, aspect=aspect, seed=seed, image=init,
                                 strength=0.6 if v["strength"] is None else v["strength"])
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=255)
    return GenerationRequest(PROMPT, preset=tier, aspect=aspect, seed=seed, image=init, mask=mask,
                             strength=v["strength"])


def run(engine: Engine, request: GenerationRequest, keep_latents: bool = False):
    job = engine.resolve(request)
    return engine.generate(dataclasses.replace(job, keep_latents=keep_latents))


class GpuSampler:
    """The GPU's SM clock, power, temperature and clock-limit reasons sampled every 100 ms (NVML, on a thread) while
    the timed runs go: the same code's medians differ between machines (2026-12-07: +2 ms a fp8 step), and this
    says whether a machine ran slower clocks. Records nothing without a CUDA GPU or nvidia-ml-py."""

    PERIOD_S = 0.1

    def __init__(self):
        self.samples: list[tuple] = []
        self._stop = None

    def __enter__(self) -> "GpuSampler":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
                pynvml.nvmlDeviceGetCurrentClocksThrottleReasons  # (its name before NVML 12.5)
        except Exception:  # noqa: BLE001 - no NVML here: nothing to record
            return self
        import threading

        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.PERIOD_S):
                try:
                    self.samples.append((
                        pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                        pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                        pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
                        reasons(handle)))
                except Exception:  # noqa: BLE001 - a failed read loses one sample
                    pass

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        clocks, power, temp, reasons = zip(*self.samples)
        seen = 0
        for r in reasons:
            seen |= r
        return {"samples": len(clocks), "sm_mhz_median": statistics.median(clocks), "sm_mhz_min": min(clocks),
                "power_w_median": round(statistics.median(power), 1), "temp_c_max": max(temp),
                "clock_event_reasons": hex(seen)}


def timed_runs(engine: Engine, v: dict, tier: str, aspect: str, runs: int) -> tuple[list[float], list]:
    """`runs` generations (seeds 1234, 1235, ...): wall seconds each (what a caller waits: stages + cleanup), results."""
    walls, rows = [], []
    for i in range(runs):
        t = time.perf_counter()
        rows.append(run(engine, request_for(v, tier, aspect, 1234 + i)))
        walls.append(time.perf_counter() - t)
    return walls, rows


def alternating_ab(engine: Engine, v: dict, tier: str, aspect: str, runs: int, current: bool,
                   use: Callable[[bool], None]) -> dict:
    """The same engine with a switch on and off (`use(side)` sets it), `runs` each, alternating so that the GPU's
    clock drift over the runs falls on both sides alike, after one untimed run per side (a side that changes what
    the step graphs capture captures there): wall and stage medians per side, on minus off."""
    sides = {True: ([], []), False: ([], [])}
    try:
        for side in (not current, current):
            use(side)
            run(engine, request_for(v, tier, aspect, 1234))
        for _ in range(runs):
            for side in (current, not current):
                use(side)
                walls, rows = timed_runs(engine, v, tier, aspect, 1)
                sides[side][0].extend(walls)
                sides[side][1].extend(rows)
    finally:
        use(current)
    report = {}
    for side, (walls, rows) in sides.items():
        report["on" if side else "off"] = {
            **{k: round(x, 4) for k, x in summarize(walls).items()},
            **{f"{stage}_s": round(statistics.median(r.timings[stage] for r in rows), 4)
               for stage in ("text_encode", "denoise", "decode", "total")}}
    report["delta_ms"] = round(1000 * (report["on"]["median"] - report["off"]["median"]), 2)
    return report


def overlap_ab(engine: Engine, v: dict, tier: str, aspect: str, runs: int) -> dict:
    """The stages overlapped and not (stages.StageClock), in one engine."""
    stages = engine.stages

    def use(side: bool) -> None:
        stages.overlap = side

    return alternating_ab(engine, v, tier, aspect, runs, stages.overlap, use)


def caption_once_ab(engine: Engine, v: dict, tier: str, aspect: str, runs: int) -> dict | None:
    """The caption refiner once per generation and at every step (caption_once.py), in one engine; the latents of
    one seed both ways."""
    from zimage import caption_once

    state = caption_once.installed(engine.pipeline.transformer)
    if state is None:
        return None

    def use(side: bool) -> None:
        state.enabled = side

    report = alternating_ab(engine, v, tier, aspect, runs, state.enabled, use)
    latents = {}
    for side in (True, False):
        use(side)
        latents[side] = run(engine, request_for(v, tier, aspect, 1234), keep_latents=True).latents[0]
    use(True)
    report["rel_l2_latents"] = float((latents[True] - latents[False]).norm() / latents[False].norm())
    return report


def vae_attention_ab(engine: Engine, v: dict, tier: str, aspect: str, runs: int) -> dict:
    """The same engine with the VAE decoder's attention the other way (vae_attention.py's GEMMs or SDPA), `runs`
    timed runs after one untimed generation that recompiles the decoder and captures its graphs for that side; then
    back, with one more untimed generation. Decode and wall medians."""
    from zimage import vae_attention

    vae = engine.pipeline.vae
    gemm = any(isinstance(a.processor, vae_attention.GemmAttnProcessor) for a in vae_attention._attentions(vae))
    graphs = cudagraph.decode_graphs(vae)

    def use(on: bool) -> None:
        vae_attention.install(vae) if on else vae_attention.uninstall(vae)
        if graphs is not None:
            graphs.clear()  # a graph replays the kernels it captured
        run(engine, request_for(v, tier, aspect, 1234))

    use(not gemm)
    try:
        walls, rows = timed_runs(engine, v, tier, aspect, runs)
    finally:
        use(gemm)
    return {"gemm_attention": not gemm, **{k: round(x, 4) for k, x in summarize(walls).items()},
            "decode_s": round(statistics.median(r.timings["decode"] for r in rows), 4)}


def host_syncs(engine: Engine, request: GenerationRequest) -> list[dict]:
    """Where one generation makes the host wait for the GPU: torch's sync debug mode warns at every synchronizing
    call; each is reported once with its count and the innermost project/diffusers frames that made it."""
    import traceback
    import warnings

    found: dict = {}

    def note(message, category, filename, lineno, file=None, line=None):
        frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                  if ("zimage" in f.filename or "diffusers" in f.filename or "bench" in f.filename)]
        key = (str(message).splitlines()[0][:120], tuple(frames[-4:]))
        found[key] = found.get(key, 0) + 1

    shown = warnings.showwarning
    warnings.showwarning = note
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = note
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(engine, request)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = shown
    return [{"count": n, "message": m, "where": list(w)} for (m, w), n in sorted(found.items(), key=lambda i: -i[1])]


def compile_stats() -> dict:
    """Dynamo/AOT/Inductor counters and phase times so far in this process (where compile time goes)."""
    try:
        from torch._dynamo.utils import counters

        stats = {group: dict(values) for group, values in counters.items()
                 if group in ("stats", "inductor", "aot_autograd", "recompiles", "graph_break")}
        stats = {g: {k: v for k, v in d.items() if "cache" in k or g in ("stats", "recompiles", "graph_break")}
                 for g, d in stats.items()}
        return stats
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return {"error": repr(exc)}


def count_flops(engine: Engine, request: GenerationRequest) -> dict:
    """FLOPs of one whole generation, by top-level model, with compiled regions forced eager."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.compiler.set_stance("force_eager"), counter:
        run(engine, request)
    by_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()
                 if name.count(".") == 0 and name != "Global"}
    return {"total": counter.get_total_flops(), "by_module": by_module}


SCHEDULE_TOGGLES = {"fa8": "fp8_attention", "fg": "fused_gemms", "lt": "lt_gemms", "c8": "cudnn_fp8_attention"}  # --ab tokens that flip a fastblocks.Schedule switch
AB_TOKENS = ("dg", "cg", "sg", "bk", "os", "co", "vga", *SCHEDULE_TOGGLES)


def ab_tokens(text: str) -> set[str]:
    """--ab's comma-separated tokens (empty: none); an unknown one is an error, not a silently skipped A/B."""
    tokens = {t.strip() for t in text.split(",") if t.strip()}
    unknown = tokens - set(AB_TOKENS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown A/B {', '.join(sorted(unknown))}; known: {', '.join(AB_TOKENS)}")
    return tokens


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_variant(args, spec: str, flops_cache: dict, reference: dict, results: list, out: Path,
                services: list, profiles: list | None = None) -> Engine | None:
    profiles = [] if profiles is None else profiles
    v = parse_variant(spec)
    spec = v["name"]
    engine, load_s = make_engine(args, v)
    shapes = (v["shapes"] or args.shapes).split(",")
    split = [tuple(shape.split(":", 1)) for shape in shapes]
    assert all(tier in TIERS and aspect in ASPECTS for tier, aspect in split), shapes
    # First calls compile: the app's warm-up, then ready (gc.freeze), as the app does.
    warm = engine.warm_up([(tier, aspect, None) for tier, aspect in split])
    firsts = {}
    for shape, (tier, aspect), entry in zip(shapes, split, warm):
        t = time.perf_counter()
        first = run(engine, request_for(v, tier, aspect, 1234), keep_latents=True)
        firsts[shape] = (first, entry["seconds"], time.perf_counter() - t)
    compiled_stats = compile_stats()
    for shape in shapes:
        tier, aspect = shape.split(":", 1)
        request = request_for(v, tier, aspect, 1234)
        first, first_s, first_task_s = firsts[shape]
        if shape not in flops_cache:
            flops_cache[shape] = {"total": 0, "by_module": {}} if args.skip_flops else count_flops(engine, request)
        with GpuSampler() as gpu:
            walls, rows = timed_runs(engine, v, tier, aspect, args.runs)
        graphed = getattr(engine.pipeline.transformer, "layers", None)
        decode_graphs = cudagraph.decode_graphs(engine.pipeline.vae)
        nodg = None
        if "dg" in args.ab and decode_graphs is not None and decode_graphs.enabled:  # dg: decoding eagerly
            decode_graphs.enabled = False
            nodg_walls, nodg_rows = timed_runs(engine, v, tier, aspect, args.runs)
            decode_graphs.enabled = True
            nodg = {k: round(x, 4) for k, x in summarize(nodg_walls).items()}
            nodg["decode_s"] = round(statistics.median(r.timings["decode"] for r in nodg_rows), 4)
            nodg["engine_total_s"] = round(statistics.median(r.timings["total"] for r in nodg_rows), 4)
        novga = None
        if "vga" in args.ab:  # vga: the VAE decoder's attention the other way (GEMMs <-> SDPA)
            novga = vae_attention_ab(engine, v, tier, aspect, args.runs)
        noos = None
        if "os" in args.ab and engine.stages is not None:  # os: the stages' overlap the other way, runs alternating
            noos = overlap_ab(engine, v, tier, aspect, args.runs)
        noco = caption_once_ab(engine, v, tier, aspect, args.runs) if "co" in args.ab else None
        nocg = None
        if "cg" in args.ab and hasattr(graphed, "enabled") and graphed.enabled:  # cg: block graphs off
            graphed.enabled = False
            nocg_walls, _ = timed_runs(engine, v, tier, aspect, args.runs)
            graphed.enabled = True
            nocg = {k: round(x, 4) for k, x in summarize(nocg_walls).items()}
        step_graphs = cudagraph.transformer_graphs(engine.pipeline.transformer)
        nosg = None
        if "sg" in args.ab and step_graphs is not None and step_graphs.enabled:  # sg: step graphs off
            step_graphs.enabled = False
            nosg_walls, _ = timed_runs(engine, v, tier, aspect, args.runs)
            nosg = {k: round(x, 4) for k, x in summarize(nosg_walls).items()}
        nobk = None
        if "bk" in args.ab and getattr(graphed, "kernels", None) is not None and not graphed.enabled:
            # bk: the same engine with the main blocks compiled by Inductor instead (A/B; step graphs off too); one
            # untimed generation compiles them first.
            stacks = cudagraph.block_stacks(engine.pipeline.transformer)  # the main blocks and the refiners
            schedules = [stack.kernels for stack in stacks]
            step_graphs_were = step_graphs is not None and step_graphs.enabled
            if step_graphs_were:  # a step graph replays the kernels it captured, whatever the stacks say now
                step_graphs.enabled = False
            for stack in stacks:
                stack.kernels = None
            run(engine, request_for(v, tier, aspect, 1234))
            nobk_walls, nobk_rows = timed_runs(engine, v, tier, aspect, args.runs)
            for stack, schedule in zip(stacks, schedules, strict=True):
                stack.kernels = schedule
            if step_graphs_were:
                step_graphs.enabled = True
            nobk = {k: round(x, 4) for k, x in summarize(nobk_walls).items()}
            nobk["per_step_ms"] = round(1000 * statistics.median(r.timings["denoise"] for r in nobk_rows)
                                        / nobk_rows[0].steps, 1)
        if step_graphs is not None and nosg is not None:
            step_graphs.enabled = True
        toggled = {}
        stacks = cudagraph.block_stacks(engine.pipeline.transformer)
        schedules = [stack.kernels for stack in stacks if getattr(stack, "kernels", None) is not None]
        for token, attr in SCHEDULE_TOGGLES.items():
            if token not in args.ab or not schedules:
                continue
            # The same engine with one of the block schedule's switches the other way (fa8: the 8-bit attention, fg:
            # the GEMMs with epilogues); the step graphs are captured again for it (and once more after). Quality:
            # latents of seed 1234 against this engine's first call.
            ab = {attr: not getattr(schedules[0], attr)}
            graph_sets = [*stacks, step_graphs]

            def switch(on: bool, attr=attr) -> None:  # every graph captured the other side's kernels: capture again
                for schedule in schedules:
                    setattr(schedule, attr, on)
                for graphs in filter(None, graph_sets):
                    graphs.clear()

            switch(ab[attr])
            other = run(engine, request_for(v, tier, aspect, 1234), keep_latents=True)
            ab_walls, ab_rows = timed_runs(engine, v, tier, aspect, args.runs)
            if args.profile_out and shape == shapes[0]:  # the other side's kernels, beside the variant's own profile
                from bench.gpu_profile import profile_generation, table as profile_table

                try:
                    ab["profile"] = profile_generation(engine, GenerationRequest(PROMPT, preset=tier, aspect=aspect,
                                                                                 seed=99))
                    print(profile_table([{"variant": f"{spec} ({token} switched)", "shape": shape,
                                          "profile": ab["profile"]}]), flush=True)
                except Exception as exc:  # noqa: BLE001 - keep the timings
                    ab["profile_error"] = repr(exc)[:500]
            switch(not ab[attr])
            ref_latents = first.latents[0]
            ab.update({k: round(x, 4) for k, x in summarize(ab_walls).items()})
            ab["per_step_ms"] = round(1000 * statistics.median(r.timings["denoise"] for r in ab_rows)
                                      / ab_rows[0].steps, 1)
            ab["rel_l2_latents_vs_first"] = round(float((other.latents[0] - ref_latents).norm() / ref_latents.norm()), 5)
            ab["nonfinite"] = not bool(torch.isfinite(other.latents[0]).all())
            toggled[f"{attr}_toggled"] = ab
            run(engine, request_for(v, tier, aspect, 1234))  # the next calls replay graphs of the variant's own kind
        syncs = host_syncs(engine, request) if args.sync_debug and torch.cuda.is_available() else None
        png = []
        for r in rows[:3]:
            t = time.perf_counter()
            images.png_bytes(r.images[0], images.metadata(r, r.seeds[0], args.model))
            png.append(time.perf_counter() - t)
        enc = {}
        for fmt in ("jpeg", "webp"):
            t = time.perf_counter()
            images.encode(rows[0].images[0], fmt)
            enc[fmt] = time.perf_counter() - t
        e2e = summarize(walls)
        flops = flops_cache[shape]["total"]
        latents = first.latents[0]
        entry = {
            "variant": spec, "shape": shape, "width": first.width, "height": first.height, "steps": first.steps,
            "runs": args.runs, "load_s": round(load_s, 2), "first_call_s": round(first_s, 2),
            "task": first.task, "strength": first.strength, "first_task_call_s": round(first_task_s, 2),
            "denoise_steps": first.steps if first.strength is None else edit_steps(first.steps, first.strength),
            "e2e_s": {k: round(x, 4) for k, x in e2e.items()},
            "engine_total_s": round(statistics.median(r.timings["total"] for r in rows), 4),
            # What the caller waits beyond the stages: the per-request gc.collect + empty_cache (engine.py).
            "cleanup_s": round(statistics.median(w - r.timings["total"] for w, r in zip(walls, rows)), 4),
            "text_encode_s": round(statistics.median(r.timings["text_encode"] for r in rows), 4),
            "denoise_s": round(statistics.median(r.timings["denoise"] for r in rows), 4),
            "decode_s": round(statistics.median(r.timings["decode"] for r in rows), 4),
            "png_encode_s": round(statistics.median(png), 4), "jpeg_encode_s": round(enc["jpeg"], 4),
            "webp_encode_s": round(enc["webp"], 4),
            "peak_vram_gib": round(max(r.peak_vram_bytes or 0 for r in rows) / 2**30, 2),
            "flops": flops, "flops_by_module": flops_cache[shape]["by_module"],
            "achieved_tflops": round(flops / e2e["median"] / 1e12, 1),
            "floor_s_at_bf16_peak": round(flops / (BF16_PEAK_TFLOPS * 1e12), 4),
            "describe": engine.describe(), "compile_stats": compiled_stats, "e2e_s_graphs_off": nocg,
            "e2e_s_block_kernels_off": nobk, "e2e_s_step_graphs_off": nosg, "e2e_s_decode_graphs_off": nodg,
            "overlap_stages_ab": noos, "caption_once_ab": noco, "vae_gemm_attention_ab": novga,
            **toggled,
            "host_syncs": syncs,
            "decode_graphs": ({"captures": decode_graphs.captures, "replays": decode_graphs.replays}
                              if decode_graphs is not None else None),
            "step_graphs": ({"captures": step_graphs.captures, "replays": step_graphs.replays}
                            if step_graphs is not None else None),
            "graphs": ({"captures": graphed.captures, "replays": graphed.replays} if hasattr(graphed, "captures")
                       else None),
            "nonfinite": any("non-finite" in w for r in rows + [first] for w in r.warnings)
            or not bool(torch.isfinite(latents).all()) or engine.stats.nonfinite_images > 0,
        }
        entry["per_step_ms"] = round(1000 * entry["denoise_s"] / entry["denoise_steps"], 1)
        key = shape
        if key not in reference:
            reference[key] = {"variant": spec, "latents": latents, "image": first.images[0]}
        else:
            ref = reference[key]
            entry["vs"] = ref["variant"]
            entry["rel_l2_latents"] = round(float((latents - ref["latents"]).norm() / ref["latents"].norm()), 5)
            a = torch.from_numpy(np.asarray(first.images[0], dtype=np.float32))
            b = torch.from_numpy(np.asarray(ref["image"], dtype=np.float32))
            entry["rel_l2_image"] = round(float((a - b).norm() / b.norm()), 5)
        entry["lt_gemm_choices"] = lt_gemm_choices()
        entry["gpu_during_runs"] = gpu.summary()
        results.append(entry)
        out.write_text(json.dumps({"device": device_name(), "torch": torch.__version__, "results": results,
                                   "service": services}, indent=1))
        summary = {k: entry[k] for k in ("variant", "shape", "e2e_s", "engine_total_s", "cleanup_s", "per_step_ms",
                                         "text_encode_s", "first_call_s", "first_task_call_s", "peak_vram_gib",
                                         "gpu_during_runs")}
        summary.update({k: v for k, v in entry.items() if k.startswith("e2e_s_") and v})  # the same engine's A/Bs
        if noos:
            summary["overlap_stages_ab"] = noos
        if novga:
            summary["vae_gemm_attention_ab"] = novga
        if noco:
            summary["caption_once_ab"] = noco
        for key, ab in toggled.items():
            summary[key] = {k: v for k, v in ab.items() if k != "profile"}
        print(json.dumps(summary), flush=True)
    if args.profile_out:  # the same engine, already compiled: one profiled generation of the first shape
        from bench.gpu_profile import profile_generation, table as profile_table

        tier, aspect = shapes[0].split(":", 1)
        row = {"variant": spec, "shape": shapes[0], "describe": engine.describe()}
        try:
            trace = Path(args.trace_dir) / (spec.replace("+", "_") + ".json.gz") if args.trace_dir else None
            row["profile"] = profile_generation(engine, GenerationRequest(PROMPT, preset=tier, aspect=aspect, seed=99),
                                                trace_path=trace)
        except Exception as exc:  # noqa: BLE001 - keep the timings
            row["profile_error"] = repr(exc)[:500]
        profiles.append(row)
        Path(args.profile_out).write_text(json.dumps({"device": device_name(), "torch": torch.__version__,
                                                      "results": profiles}, indent=1))
        print(profile_table([row]), flush=True)
    if spec == args.service_variant.partition("@")[0]:
        service = {"variant": spec, "shape": "Standard:1:1", **service_and_cleanup(engine, args, args.service_runs)}
        print(json.dumps(service), flush=True)
        services.append(service)
        out.write_text(json.dumps({"device": device_name(), "torch": torch.__version__, "results": results,
                                   "service": services}, indent=1))
    return engine


def lt_gemm_choices() -> list[dict]:
    """The cuBLASLt algorithms timed so far in this process (lt_gemms): per GEMM shape, every candidate's us and the
    one chosen (the heuristic's first is what torch runs)."""
    from zimage import lt_gemm

    shapes = lt_gemm._GEMMS.shapes.values() if lt_gemm._GEMMS is not None else []
    return [{"rows_in_out": list(s.dims), "e4m3": s.fp8, "times_us": [round(t, 1) for t in s.times_us],
             "chosen": int(np.argmin(s.times_us)) if s.times_us else 0} for s in shapes if s is not None]


def service_and_cleanup(engine: Engine, args, runs: int) -> dict:
    """The same Standard request through the running app's /v1/images/generations vs a direct engine call,
    per output format; then the per-request cache release on vs off, interleaved A/B on the same engine."""
    import base64
    import socket
    import threading
    import urllib.request

    import uvicorn

    from zimage.server import create_service

    request = GenerationRequest(PROMPT, preset="Standard", aspect="1:1", seed=7)
    settings = engine.settings.replace(outputs=Path(args.cache_dir) / "bench-outputs", queue_size=8)
    service = create_service(settings, engine=engine)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(service.app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def direct() -> float:
        t = time.perf_counter()
        run(engine, request)
        return time.perf_counter() - t

    def via_api(fmt: str) -> float:
        body = json.dumps({"prompt": PROMPT, "quality": "Standard", "seed": 7, "output_format": fmt}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", body,
                                     {"Content-Type": "application/json"})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as resp:
            data = json.loads(resp.read())
        elapsed = time.perf_counter() - t
        base64.b64decode(data["data"][0]["b64_json"])
        return elapsed

    report: dict = {"direct_s": statistics.median([direct() for _ in range(runs)])}
    for fmt in ("jpeg", "webp", "png"):
        via_api(fmt)  # first call per format warms the encoder
        report[f"api_{fmt}_s"] = statistics.median([via_api(fmt) for _ in range(runs)])
        report[f"overhead_{fmt}_ms"] = round(1000 * (report[f"api_{fmt}_s"] - report["direct_s"]), 1)
    service.store.flush()
    server.should_exit = True
    thread.join(timeout=30)

    with_release, without = [], []
    for i in range(2 * runs):
        engine.release_after_request = i % 2 == 0
        t = time.perf_counter()
        run(engine, request)
        (with_release if i % 2 == 0 else without).append(time.perf_counter() - t)
    engine.release_after_request = True
    report["cleanup_on_s"] = statistics.median(with_release)
    report["cleanup_off_s"] = statistics.median(without)
    report["cleanup_cost_pct"] = round(100 * (report["cleanup_on_s"] / report["cleanup_off_s"] - 1), 2)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def table(results: list[dict]) -> str:
    head = (f"{'variant':<28} {'shape':<13} {'e2e med':>8} {'min':>7} {'max':>7} {'enc':>6} {'ms/step':>7} "
            f"{'dec':>6} {'png':>6} {'1st':>6} {'GiB':>5} {'TFLOP/s':>7} {'floor':>6} {'relL2':>7} nan")
    lines = [head]
    for e in results:
        lines.append(
            f"{e['variant']:<28} {e['shape']:<13} {e['e2e_s']['median']:>8.3f} {e['e2e_s']['min']:>7.3f} "
            f"{e['e2e_s']['max']:>7.3f} {e['text_encode_s']:>6.3f} {e['per_step_ms']:>7.1f} {e['decode_s']:>6.3f} "
            f"{e['png_encode_s']:>6.3f} {e['first_call_s']:>6.1f} {e['peak_vram_gib']:>5.1f} "
            f"{e['achieved_tflops']:>7.1f} {e['floor_s_at_bf16_peak']:>6.3f} "
            f"{e.get('rel_l2_latents', float('nan')):>7.4f} {'NaN!' if e['nonfinite'] else 'ok'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random-full")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default="eager+native,compiled+native")
    ap.add_argument("--shapes", default="Standard:1:1")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--cache-dir", default=os.environ.get("ZIMAGE_CACHE_DIR", "/tmp/zimage-bench-cache"))
    ap.add_argument("--out", default="latency.json")
    ap.add_argument("--service-variant", default="", help="also time the HTTP API and cleanup on this variant")
    ap.add_argument("--service-runs", type=int, default=6)
    ap.add_argument("--profile-out", default="", help="also profile one generation per variant (bench/gpu_profile.py)")
    ap.add_argument("--trace-dir", default="", help="with --profile-out: chrome traces (.json.gz) here")
    ap.add_argument("--skip-flops", action="store_true", help="do not count FLOPs (saves one eager generation)")
    ap.add_argument("--ab", default="dg,cg,sg,bk", type=ab_tokens,
                    help="the same-engine A/Bs to run, comma-separated (empty: none): dg decode graphs off, cg block "
                         "graphs off, sg step graphs off, bk block kernels off, os the stages' overlap (runs alternating), "
                         "co the caption refiner once per generation or at every step (runs alternating), lt the blocks' GEMMs "
                         "on cuBLASLt with timed algorithms or torch's, "
                         "vga the VAE decoder's attention (GEMMs or SDPA), "
                         "fg the GEMMs with epilogues and fa8 "
                         "the blocks' 8-bit attention"
                         "switched the other way (with its latents' rel-L2)")
    ap.add_argument("--sync-debug", action="store_true", help="also list where one generation waits for the GPU")
    ap.add_argument("--kernel-config", default="", help="a JSON file of launch parameters for zimage/kernels.py "
                    "(bench/kernels.py writes the fastest as best_config)")
    ap.add_argument("--attention-config", default="", help="a JSON file of launch parameters for "
                    "zimage/fp8_attention.py (bench/attention.py --sweep writes the fastest as best_config)")
    args = ap.parse_args(argv)
    if args.attention_config:
        from zimage import fp8_attention

        fp8_attention.CONFIG.update(json.loads(Path(args.attention_config).read_text())["best_config"] or {})
        print(f"8-bit attention launch parameters: {fp8_attention.CONFIG}", flush=True)
    if args.kernel_config:
        from zimage import fused_gemm, kernels

        config = json.loads(Path(args.kernel_config).read_text())
        for name, params in config.get("best_config", config).items():
            (kernels.CONFIG if name in kernels.CONFIG else fused_gemm.CONFIG)[name].update(params)
        fused_gemm.USE.update(config.get("use", {}))  # which GEMMs run fused under fused_gemms
        print(f"kernel launch parameters: {kernels.CONFIG} {fused_gemm.CONFIG}; fused: {fused_gemm.USE}", flush=True)
    out = Path(args.out)
    results, flops_cache, reference, services, profiles = [], {}, {}, [], []
    for spec in args.variants.split(","):
        engine = None
        try:
            engine = run_variant(args, spec, flops_cache, reference, results, out, services, profiles)
        except Exception as exc:  # keep going: one broken variant must not lose the others' numbers
            print(f"variant {spec} failed: {exc!r}"[:500], flush=True)
            results_note = {"variant": spec, "error": repr(exc)[:500]}
            out.with_suffix(".errors.jsonl").open("a").write(json.dumps(results_note) + "\n")
        finally:
            if engine is not None:  # Gradio may keep the service (and so the engine) alive: drop the model
                engine.close()
            del engine
            gc.collect()
            torch.compiler.reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(table(results))
    for sv in services:
        print(f"service ({sv['variant']}): direct {sv['direct_s']:.3f}s; overhead jpeg {sv['overhead_jpeg_ms']} ms, "
              f"webp {sv['overhead_webp_ms']} ms, png {sv['overhead_png_ms']} ms; cleanup on {sv['cleanup_on_s']:.3f}s "
              f"off {sv['cleanup_off_s']:.3f}s ({sv['cleanup_cost_pct']:+.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
