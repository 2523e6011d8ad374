"""(Not `bench/profile.py`: a script folder on sys.path would shadow the stdlib `profile` that torch._dynamo
imports through cProfile.) Where one generation's GPU time goes: torch.profiler breakdown by kernel category, stage, idle gaps.

    python bench/gpu_profile.py --model random-full --variants compiled+native+tec,compiled+native+tec+fp8 \
        --shape Standard:1:1 --out profile.json [--trace-dir DIR]

Variants are bench/latency.py's tokens (same parser). Per variant: a fresh engine, three warm-up generations
(compile, autotune), mark_ready (as the app does), then one profiled generation. Reported:
- kernel time per category: gemm, attention, norm, rope/complex, fp8 quant, elementwise (triton/eager),
  copies/layout, vae conv, other -- summed over the generation and per stage;
- per stage (text_encode / denoise / decode, from record_function ranges around the engine's stage methods):
  wall, kernel-busy time (union of kernel intervals), busy fraction, idle gaps (sum, count > 20 us, top 10);
- the top-N kernels by total time, with launch counts.
`bench/latency.py --profile-out FILE` runs the same breakdown on each variant it already timed (one compile).
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

STAGES = ("text_encode", "denoise", "decode")
# Order matters: the first pattern that matches names the category.
CATEGORIES = [
    ("rope/complex", re.compile(r"complex|polar|view_as_real", re.I)),
    ("norm", re.compile(r"rsqrt|RowwiseMoments|welford|var_mean|layer_norm|group_norm|_norm_", re.I)),
    # Inductor names a kernel after the ops it fused: one that only prepares an SDPA input is a layout copy.
    ("copies/layout", re.compile(r"^triton_.*scaled_dot_product|nchwToNhwc|nhwcToNchw|CatArray|copy_kernel|memcpy|"
                                 r"memset|transpose|permute", re.I)),
    ("attention", re.compile(r"flash|fmha|sdpa|attention|attn", re.I)),
    ("vae conv", re.compile(r"conv|fprop|implicit_gemm|dgrad|winograd", re.I)),
    ("fp8 quant", re.compile(r"^triton_.*(amax|abs)|float8|quantize", re.I)),
    ("gemm", re.compile(r"gemm|xmma|cutlass|nvjet|matmul|scaled_mm|gemv|_mm_|f8f8|splitk|cublas|sm90_", re.I)),
    ("elementwise", re.compile(r"^triton_|elementwise|reduce_kernel|vectorized|unrolled|index|scatter|gather", re.I)),
]


def category(name: str) -> str:
    for cat, rx in CATEGORIES:
        if rx.search(name):
            return cat
    return "other"


def union_us(intervals) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def gaps_us(intervals) -> list[float]:
    return [e - s for s, e in gap_spans(intervals)]


def gap_spans(intervals) -> list[tuple[float, float]]:
    """(start, end) of every stretch between kernels where the GPU ran nothing."""
    ks = sorted(intervals)
    if not ks:
        return []
    out, end = [], ks[0][1]
    for s, e in ks[1:]:
        if s > end:
            out.append((end, s))
        end = max(end, e)
    return out


def host_during(spans, host_events, n: int = 4) -> list[dict]:
    """For each idle span: the host-side events (aten ops, CUDA runtime calls) running at its midpoint, longest
    first -- what the CPU was doing while the GPU waited."""
    out = []
    for start, end in spans:
        mid = (start + end) / 2
        busy = sorted(((e - s, name) for name, s, e in host_events if s <= mid <= e), reverse=True)[:n]
        out.append({"gap_us": round(end - start, 1), "host": [f"{name} ({d / 1000:.2f} ms)" for d, name in busy]})
    return out


class _StageRanges:
    """Wraps the engine's stage methods (zimage/stages.py) in record_function ranges ending in a device sync, so
    each stage's kernels fall inside its CPU range (the engine syncs right after each stage anyway)."""

    METHODS = {"encode": "text_encode", "denoise": "denoise", "decode": "decode"}

    def __init__(self, engine):
        self.engine, self.saved = engine.stages, {}

    def __enter__(self):
        for method, stage in self.METHODS.items():
            original = getattr(self.engine, method)
            self.saved[method] = original

            def wrapped(*args, _original=original, _stage=stage, **kwargs):
                with torch.profiler.record_function(f"stage:{_stage}"):
                    out = _original(*args, **kwargs)
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    return out

            setattr(self.engine, method, wrapped)
        return self

    def __exit__(self, *exc):
        for method in self.saved:
            try:
                delattr(self.engine, method)  # back to the class method
            except AttributeError:
                pass


def profile_generation(engine, request, top: int = 30, trace_path: Path | None = None) -> dict:
    """Profile one engine.generate(request) and return the breakdown (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with _StageRanges(engine), profile(activities=activities, record_shapes=False) as prof:
        t0 = time.perf_counter()
        result = engine.generate(engine.resolve(request))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels, ranges, host = [], {}, []
    for ev in prof.events():
        tr = ev.time_range
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            if not ev.name.startswith(("stage:", "ProfilerStep")):  # GPU-side copies of user annotations
                kernels.append((ev.name, tr.start, tr.end))
        elif ev.name.startswith("stage:"):
            ranges.setdefault(ev.name[6:], []).append((tr.start, tr.end))
        elif not ev.name.startswith("ProfilerStep"):
            host.append((ev.name, tr.start, tr.end))
    report = {"wall_s": round(wall, 4), "engine_timings": result.timings, "kernels": len(kernels)}
    if not kernels:
        return report
    by_cat: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for name, s, e in kernels:
        c = category(name)
        by_cat[c] = by_cat.get(c, 0.0) + (e - s)
        entry = by_name.setdefault(name, [0, 0.0, c])
        entry[0] += 1
        entry[1] += e - s
    report["by_category_ms"] = {k: round(v / 1000, 2) for k, v in sorted(by_cat.items(), key=lambda x: -x[1])}
    report["kernel_ms"] = round(sum(by_cat.values()) / 1000, 2)
    report["top_kernels"] = [{"name": n[:160], "count": c, "ms": round(t / 1000, 2), "cat": cat}
                             for n, (c, t, cat) in sorted(by_name.items(), key=lambda x: -x[1][1])[:top]]
    stages = {}
    for stage in STAGES:
        windows = ranges.get(stage, [])
        if not windows:
            continue
        inside = [(n, s, e) for n, s, e in kernels if any(ws <= s <= we for ws, we in windows)]
        window_us = sum(we - ws for ws, we in windows)
        intervals = [(s, e) for _, s, e in inside]
        busy = union_us(intervals)
        # the GPU's own window: first kernel start to last kernel end inside the stage
        gpu_window = (max(e for _, e in intervals) - min(s for s, _ in intervals)) if intervals else 0.0
        spans = sorted(gap_spans(intervals), key=lambda se: se[0] - se[1])  # longest first
        gaps = [e - s for s, e in spans]
        cats: dict[str, float] = {}
        for n, s, e in inside:
            cats[category(n)] = cats.get(category(n), 0.0) + (e - s)
        stages[stage] = {
            "wall_ms": round(window_us / 1000, 2), "gpu_window_ms": round(gpu_window / 1000, 2),
            "busy_ms": round(busy / 1000, 2), "busy_fraction": round(busy / gpu_window, 3) if gpu_window else None,
            "kernels": len(inside), "idle_ms": round(sum(gaps) / 1000, 2),
            "gaps_over_20us": sum(g > 20 for g in gaps), "top_gaps_us": [round(g, 1) for g in gaps[:10]],
            "by_category_ms": {k: round(v / 1000, 2) for k, v in sorted(cats.items(), key=lambda x: -x[1])},
            "host_during_top_gaps": host_during(spans[:8], host),
        }
    report["stages"] = stages
    if trace_path is not None:
        try:
            raw = trace_path.with_suffix("")  # foo.json.gz -> foo.json
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as f, gzip.open(trace_path, "wb") as g:
                shutil.copyfileobj(f, g)
            raw.unlink()
            report["trace"] = str(trace_path)
        except Exception as exc:  # noqa: BLE001 - the trace is a bonus
            report["trace_error"] = repr(exc)[:300]
    return report


def table(rows: list[dict]) -> str:
    """One block per variant: categories (whole generation and denoise), then stage busy/idle."""
    cats = [c for c, _ in CATEGORIES] + ["other"]
    lines = []
    for row in rows:
        p = row.get("profile") or {}
        if "by_category_ms" not in p:
            lines.append(f"{row['variant']}: no kernels recorded {row.get('profile_error', '')}")
            continue
        den = p.get("stages", {}).get("denoise", {})
        lines.append(f"== {row['variant']}  wall {p['wall_s']:.3f}s  kernels {p['kernel_ms']:.1f} ms")
        lines.append(f"   {'category':<15} {'all ms':>8} {'denoise':>8}")
        for c in cats:
            a, d = p["by_category_ms"].get(c, 0.0), den.get("by_category_ms", {}).get(c, 0.0)
            if a or d:
                lines.append(f"   {c:<15} {a:>8.1f} {d:>8.1f}")
        lines.append(f"   {'stage':<12} {'wall':>7} {'gpu win':>7} {'busy':>7} {'busy%':>6} {'idle':>7} {'gaps>20us':>9}")
        for stage, st in p.get("stages", {}).items():
            frac = st["busy_fraction"] * 100 if st["busy_fraction"] is not None else float("nan")
            lines.append(f"   {stage:<12} {st['wall_ms']:>7.1f} {st['gpu_window_ms']:>7.1f} {st['busy_ms']:>7.1f} "
                         f"{frac:>5.1f}% {st['idle_ms']:>7.1f} {st['gaps_over_20us']:>9}")
        for k in p["top_kernels"][:8]:
            lines.append(f"   {k['ms']:>8.1f} ms {k['count']:>5}x  {k['cat']:<13} {k['name'][:90]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.latency import PROMPT, make_engine, parse_variant
    from zimage.presets import ASPECTS, TIERS
    from zimage.request import GenerationRequest

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random-full")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default="compiled+native+tec")
    ap.add_argument("--shape", default="Standard:1:1")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--cache-dir", default="/tmp/zimage-bench-cache")
    ap.add_argument("--out", default="profile.json")
    ap.add_argument("--trace-dir", default=None, help="also write each variant's chrome trace (.json.gz) here")
    args = ap.parse_args(argv)
    tier, aspect = args.shape.split(":", 1)
    assert tier in TIERS and aspect in ASPECTS, args.shape
    rows = []
    for spec in args.variants.split(","):
        v = parse_variant(spec)
        engine, load_s = make_engine(args, v)
        row = {"variant": v["name"], "load_s": round(load_s, 2)}
        try:
            engine.warm_up([(tier, aspect, None)] * args.warmup)  # compile, autotune, then ready (gc.freeze)
            trace = None
            if args.trace_dir:
                Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
                trace = Path(args.trace_dir) / (re.sub(r"[^A-Za-z0-9_-]", "_", v["name"]) + ".json.gz")
            row["describe"] = engine.describe()
            row["profile"] = profile_generation(engine, GenerationRequest(PROMPT, preset=tier, aspect=aspect, seed=99),
                                                top=args.top, trace_path=trace)
        except Exception as exc:  # noqa: BLE001 - keep the other variants
            row["profile_error"] = repr(exc)[:500]
        rows.append(row)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                                              else "cpu", "torch": torch.__version__, "shape": args.shape,
                                              "results": rows}, indent=1))
        engine.close()
        del engine
        torch.compiler.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
