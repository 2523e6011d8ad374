"""LoRA cost on the engine: per-step time without / with one LoRA / switching LoRAs between requests, first-use
and switch latency, recompilations, peak memory; bf16 and fp8.

    python bench/lora.py --model random-full --variants bf16,fp8 --shape Standard:1:1 --runs 6 --out lora.json
    python bench/lora.py --quick --out /tmp/lora-quick.json      # CPU smoke on the tiny demo model (minutes)

A variant is '+'-joined tokens: bf16 | fp8 (torchao rowwise base weights; the LoRA branch stays bf16),
merge (--lora-mode merge: LoRAs added into the weights per request instead of the branch; fp8: re-quantized),
eager (no compile), rN (slot rank N, default --rank), two (also two LoRAs at once: needs rN >= 2 x --lora-rank
in branch mode).
Random LoRAs of rank --lora-rank (default 64) are written in diffusers' layout to a temporary LoRA folder,
over the layers real Z-Image LoRAs train (musubi-tuner, ai-toolkit, diffusers' conversion): attention
to_q/to_k/to_v/to_out.0 and feed_forward w1/w2/w3 of the 30 main blocks and the 2+2 refiners.

Per variant, a fresh engine (compile on unless `eager`), then:
  warm-up    the service's own (Engine.warm_up: the shape, then the LoRA branch with zero weights, since the
             folder holds LoRAs); with a WxH shape (--quick) the same two first calls by hand
  none       --runs requests without LoRA            -> per-step ms (the denoise stage's time / steps)
  first use  one request with a LoRA never used before (read from disk, converted, copied in; no compile)
  one        --runs requests with the same LoRA      -> per-step ms, overhead vs none
  switch     --runs requests alternating LoRAs A/B   -> per-step ms, switch latency (slots rewritten)
  two        (token `two`) A at 0.7 and B at 0.5 together
  none again --runs requests without LoRA            -> the no-LoRA path is unchanged after LoRAs
Recompilations: Dynamo's graph and recompile counters after warm-up vs at the end (must not grow).
Checks: scale 0 gives the no-LoRA latents exactly; a LoRA changes them (relative L2 reported).
Prints a table; writes JSON as it goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from zimage.engine import Engine  # noqa: E402
from zimage.presets import ASPECTS, TIERS  # noqa: E402
from zimage.request import GenerationRequest  # noqa: E402
from zimage.settings import Settings  # noqa: E402

PROMPT = ("A cinematic photograph of a young woman in a red Hanfu with intricate gold embroidery, holding a round "
          "folding fan, standing in front of the Big Wild Goose Pagoda at night, soft bokeh city lights, 85mm lens")
TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def write_random_loras(folder: Path, transformer, names, rank: int, seed: int = 0) -> dict:
    """Random rank-`rank` LoRAs (diffusers layout, bf16) over TARGETS of every block; returns their layer count."""
    from diffusers import ZImagePipeline

    from zimage.lora import LoraLinear

    layers = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLinear) and name.endswith(TARGETS):  # every Linear (bf16 or fp8) is wrapped
            layers[name] = (module.in_features, module.out_features)
    assert layers, "no LoRA target layers found"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for i, lora_name in enumerate(names):
        g = torch.Generator(device).manual_seed(seed + i)
        weights = {}
        for name, (n_in, n_out) in sorted(layers.items()):
            weights[f"{name}.lora_A.weight"] = (torch.randn(rank, n_in, generator=g, device=device) / n_in ** 0.5
                                                ).to("cpu", torch.bfloat16)
            weights[f"{name}.lora_B.weight"] = (torch.randn(n_out, rank, generator=g, device=device) * 0.02
                                                / rank ** 0.5).to("cpu", torch.bfloat16)
        ZImagePipeline.save_lora_weights(folder, transformer_lora_layers=weights, weight_name=f"{lora_name}.safetensors",
                                         transformer_lora_adapter_metadata={"r": rank, "lora_alpha": rank,
                                                                            "target_modules": list(TARGETS)})
    return {"layers": len(layers), "bytes_per_file": (folder / f"{names[0]}.safetensors").stat().st_size}


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"], "recompiles": sum(counters["recompiles"].values()),
            "frames_ok": counters["frames"]["ok"]}


def request_for(shape: str, steps: int | None, seed: int, loras=None) -> GenerationRequest:
    if ":" in shape:
        tier, aspect = shape.split(":", 1)
        return GenerationRequest(PROMPT, preset=tier, aspect=aspect, steps=steps, seed=seed, loras=loras)
    width, height = map(int, shape.lower().split("x"))
    return GenerationRequest(PROMPT, width=width, height=height, steps=steps or 8, seed=seed, loras=loras)


def parse_variant(spec: str, default_rank: int) -> dict:
    v = {"name": spec, "fp8": False, "compile": True, "slot_rank": default_rank, "two": False, "mode": "branch"}
    for tok in spec.split("+"):
        if tok == "bf16":
            continue
        if tok == "fp8":
            v["fp8"] = True
        elif tok == "eager":
            v["compile"] = False
        elif tok == "two":
            v["two"] = True
        elif tok == "merge":
            v["mode"] = "merge"
        elif tok.startswith("r") and tok[1:].isdigit():
            v["slot_rank"] = int(tok[1:])
        else:
            raise SystemExit(f"unknown variant token {tok!r} in {spec!r}")
    return v


def run_variant(args, spec: str) -> dict:
    v = parse_variant(spec, args.rank if args.rank else args.lora_rank)
    folder = Path(tempfile.mkdtemp(prefix="zimage-lora-bench-"))
    settings = Settings(model=args.model, device=args.device, dtype=args.dtype,
                        compile="on" if v["compile"] else "off", fp8="on" if v["fp8"] else "off",
                        memory_profile="full" if args.device != "cpu" else "auto", embed_cache=0, warmup="off",
                        cache_dir=Path(args.cache_dir), lora_dir=folder, lora_rank=v["slot_rank"], max_loras=4,
                        lora_mode=v["mode"])
    t0 = time.perf_counter()
    engine = Engine.create(settings)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    files = write_random_loras(folder, engine.pipeline.transformer, ["A", "B", "C"], args.lora_rank)
    write_s = time.perf_counter() - t0
    entry = {"variant": spec, "shape": args.shape, "describe": engine.describe(), "load_s": round(load_s, 2),
             "lora_rank": args.lora_rank, "slot_rank": v["slot_rank"], "lora_files": files,
             "write_loras_s": round(write_s, 2)}

    def gen(loras=None, seed=1234, keep=False):
        job = engine.resolve(request_for(args.shape, args.steps, seed, loras))
        if keep:
            import dataclasses

            job = dataclasses.replace(job, keep_latents=True)
        t = time.perf_counter()
        result = engine.generate(job)
        return result, time.perf_counter() - t

    # Warm-up: the service's own for a preset shape (it runs the LoRA branch too: the folder holds LoRAs).
    before = dynamo_counts()
    t0 = time.perf_counter()
    if ":" in args.shape:
        tier, aspect = args.shape.split(":", 1)
        assert tier in TIERS and aspect in ASPECTS, args.shape
        entry["warm_up"] = engine.warm_up([(tier, aspect, args.steps)])
    else:
        warm = []
        for lora_branch in (False, True):
            t = time.perf_counter()
            if lora_branch:
                with engine.loras.warming():
                    engine._generate(engine.resolve(request_for(args.shape, 1, 0)), None, None, allow_warming=True)
            else:
                engine._generate(engine.resolve(request_for(args.shape, 1, 0)), None, None, allow_warming=True)
            warm.append({"lora_branch": lora_branch, "seconds": round(time.perf_counter() - t, 3)})
        engine.mark_ready()
        entry["warm_up"] = warm
    entry["warm_up_total_s"] = round(time.perf_counter() - t0, 2)
    after_warm = dynamo_counts()
    entry["compile_counts_warm_up"] = {k: after_warm[k] - before[k] for k in after_warm}

    def timed(label: str, loras_for) -> dict:
        steps, walls, switches, peaks = [], [], [], []
        for i in range(args.runs):
            result, wall = gen(loras_for(i), seed=1234 + i)
            steps.append(result.timings["denoise"] / result.steps)
            walls.append(wall)
            if "lora" in result.timings:
                switches.append(result.timings["lora"])
            peaks.append(result.peak_vram_bytes or 0)
        row = {"per_step_ms": round(1000 * statistics.median(steps), 2),
               "per_step_ms_min": round(1000 * min(steps), 2), "e2e_s": round(statistics.median(walls), 4),
               "peak_vram_gib": round(max(peaks) / 2**30, 2)}
        if switches:
            row["apply_ms_median"] = round(1000 * statistics.median(switches), 2)
            row["apply_ms_max"] = round(1000 * max(switches), 2)
        entry[label] = row
        print(json.dumps({"variant": spec, label: row}), flush=True)
        return row

    none = timed("none", lambda i: None)
    # First use of a LoRA never seen: disk read, diffusers conversion, copy to the device, into the slots.
    result, wall = gen([{"name": "C", "scale": 1.0}], seed=99)
    entry["first_use"] = {"e2e_s": round(wall, 4), "apply_s": result.timings.get("lora"),
                          "load_s": round(engine.loras.stats.last_load_seconds, 4),
                          "added_s_vs_none_e2e": round(wall - none["e2e_s"], 4)}
    one = timed("one", lambda i: [{"name": "A", "scale": 1.0}])
    switch = timed("switch", lambda i: [{"name": "AB"[i % 2], "scale": 1.0}])
    if v["two"]:
        timed("two", lambda i: [{"name": "A", "scale": 0.7}, {"name": "B", "scale": 0.5}])
    timed("none_again", lambda i: None)
    for label, row in (("one", one), ("switch", switch)):
        entry[f"{label}_overhead_pct"] = round(100 * (row["per_step_ms"] / none["per_step_ms"] - 1), 2)
    end = dynamo_counts()
    entry["compile_counts_after_warm_up"] = {k: end[k] - after_warm[k] for k in end}
    entry["recompiled_after_warm_up"] = any(end[k] != after_warm[k] for k in ("unique_graphs", "recompiles"))

    # Correctness on the same engine: scale 0 is the no-LoRA path exactly; a LoRA changes the latents.
    plain, _ = gen(None, seed=7, keep=True)
    zero, _ = gen([{"name": "A", "scale": 0.0}], seed=7, keep=True)
    with_a, _ = gen([{"name": "A", "scale": 1.0}], seed=7, keep=True)
    ref = plain.latents[0]
    entry["scale0_equals_none"] = bool(torch.equal(zero.latents[0], ref))
    entry["lora_rel_l2_vs_none"] = round(float((with_a.latents[0] - ref).norm() / ref.norm()), 5)
    entry["finite"] = bool(torch.isfinite(with_a.latents[0]).all())
    entry["lora_stats"] = engine.loras.describe()
    engine.close()
    engine = None  # noqa: F841 - drop the model before the next variant
    gc.collect()
    torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for path in folder.glob("*"):
        path.unlink()
    folder.rmdir()
    return entry


def table(results: list[dict]) -> str:
    lines = [f"{'variant':<16} {'shape':<14} {'none ms/step':>12} {'1 LoRA':>8} {'+%':>6} {'switch':>8} {'+%':>6} "
             f"{'apply ms':>9} {'1st use s':>9} {'warm s':>7} {'recompiled':>10} {'GiB none/LoRA':>14} scale0"]
    for e in results:
        if "error" in e:
            lines.append(f"{e['variant']:<16} error: {e['error'][:100]}")
            continue
        lines.append(
            f"{e['variant']:<16} {e['shape']:<14} {e['none']['per_step_ms']:>12.2f} {e['one']['per_step_ms']:>8.2f} "
            f"{e['one_overhead_pct']:>6.1f} {e['switch']['per_step_ms']:>8.2f} {e['switch_overhead_pct']:>6.1f} "
            f"{e['switch'].get('apply_ms_median', float('nan')):>9.1f} {e['first_use']['e2e_s']:>9.3f} "
            f"{e['warm_up_total_s']:>7.1f} {str(e['recompiled_after_warm_up']):>10} "
            f"{e['none']['peak_vram_gib']:>6.2f}/{e['one']['peak_vram_gib']:<7.2f} {e['scale0_equals_none']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random-full")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--variants", default="bf16,fp8")
    ap.add_argument("--shape", default="Standard:1:1", help="TIER:ASPECT (the service's warm-up) or WxH")
    ap.add_argument("--steps", type=int, default=None, help="default: the preset's (8 for Standard)")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--lora-rank", type=int, default=64, help="rank of each random LoRA")
    ap.add_argument("--rank", type=int, default=0, help="slot rank (--lora-rank of the engine); default = --lora-rank")
    ap.add_argument("--cache-dir", default=os.environ.get("ZIMAGE_CACHE_DIR", "/tmp/zimage-bench-cache"))
    ap.add_argument("--out", default="lora.json")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke: tiny demo model, compiled on CPU, 256x256, 4 steps, rank 8, 3 runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.device, args.dtype, args.variants = "tiny", "cpu", "fp32", "bf16,bf16+merge,eager+two+r16"
        args.shape, args.steps, args.runs, args.lora_rank = "256x256", 4, 3, 8
    results = []
    out = Path(args.out)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for spec in args.variants.split(","):
        try:
            results.append(run_variant(args, spec))
        except Exception as exc:  # keep the other variants' numbers
            import traceback

            traceback.print_exc()
            results.append({"variant": spec, "error": repr(exc)[:500]})
        out.write_text(json.dumps({"device": device, "torch": torch.__version__, "args": vars(args),
                                   "results": results}, indent=1, default=str))
    print(table(results))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
