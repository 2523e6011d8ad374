#!/usr/bin/env python3
"""cuBLASLt's algorithms for the DiT block's bf16 GEMMs, each one timed, against torch's F.linear (cuBLAS's own pick).

Why: bf16 Standard sits at 0.80 s (H100, 2026-12-07), ~95 ms a step of which the GEMMs are ~70 ms at ~720 TF/s.
cuBLAS runs the first algorithm of its heuristic. nvmath-python (pip: nvmath-python, cuda-core) lists cuBLASLt's
heuristic candidates for a shape and executes any one of them. If one is >= 3 % faster on the big GEMMs, a step
gains ~2 ms, and the switch that calls it is worth building. Predicted: the heuristic's first pick within 2 % of the
best (cuBLAS is tuned for Hopper at these sizes), so most likely no gain.

Shapes: M = 4352 rows (Standard: 4096 image tokens + a 256-token caption), the fused q/k/v (3840 -> 11520), the
attention output (3840 -> 3840), the fused w1/w3 (3840 -> 20480) and w2 (10240 -> 3840). Activations row-major,
the weight (N, K) row-major as F.linear has it (cuBLASLt sees its transpose, column-major). Timing: CUDA events
around --iters calls queued behind a GPU sleep (so the host's per-call cost never idles the GPU), median of --reps.

Run:  python3 bench/gemm_algos.py --out $OUT/gemm-algos.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROWS = 4352
SHAPES = {"qkv": (3840, 11520), "out": (3840, 3840), "w13": (3840, 20480), "w2": (10240, 3840)}  # (K, N)
PER_STEP = 30  # each shape once per main block


def gpu_us(fn, iters: int, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda._sleep(20_000_000)  # ~10 ms: the calls below queue up behind it
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def describe(algorithm) -> dict:
    out = {}
    for name in ("algorithm_id", "tile", "stages", "split_k", "cluster_shape", "cta_swizzling", "inner_shape"):
        try:
            value = getattr(algorithm, name)
            out[name] = value if isinstance(value, int | str | bool) else str(value)
        except Exception as exc:  # noqa: BLE001 - a property the algorithm does not expose
            out[name] = f"n/a ({type(exc).__name__})"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=64, help="heuristic candidates per shape")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; stop adding candidates after this")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS, "shapes": {}}
    try:
        import nvmath
        from nvmath.linalg.advanced import Matmul

        report["nvmath"] = nvmath.__version__
    except Exception as exc:  # noqa: BLE001 - still time cuBLAS
        Matmul, report["nvmath_error"] = None, f"{type(exc).__name__}: {exc}"[:500]
    gen = torch.Generator("cuda").manual_seed(0)
    for name, (k, n) in SHAPES.items():
        a = torch.randn(ROWS, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k ** -0.5
        flops = 2 * ROWS * k * n
        reference = F.linear(a, w)
        row = {"k": k, "n": n, "cublas_us": gpu_us(lambda: F.linear(a, w), args.iters, args.reps)}
        try:
            torch.backends.cuda.preferred_blas_library("cublaslt")
            row["cublaslt_pref_us"] = gpu_us(lambda: F.linear(a, w), args.iters, args.reps)
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")
        candidates = []
        if Matmul is not None:
            try:
                mm = Matmul(a, w.t())
                algorithms = mm.plan(preferences={"limit": args.limit})
                for rank, algorithm in enumerate(algorithms):
                    if time.perf_counter() - t0 > args.budget:
                        row["stopped_at_rank"] = rank
                        break
                    entry = {"rank": rank, **describe(algorithm)}
                    try:
                        result = mm.execute(algorithm=algorithm)
                        entry["rel_l2"] = float((result.float() - reference.float()).norm() / reference.float().norm())
                        entry["us"] = gpu_us(lambda: mm.execute(algorithm=algorithm), args.iters, args.reps)
                    except Exception as exc:  # noqa: BLE001 - record and go on
                        entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    candidates.append(entry)
                mm.free()
            except Exception as exc:  # noqa: BLE001
                row["nvmath_error"] = f"{type(exc).__name__}: {exc}"[:500]
        timed = [c for c in candidates if "us" in c and c["rel_l2"] < 1e-2]
        row["candidates"] = candidates
        if timed:
            best = min(timed, key=lambda c: c["us"])
            row.update(first_us=timed[0]["us"] if timed[0]["rank"] == 0 else None, best_us=best["us"],
                       best_rank=best["rank"], gain_vs_cublas_pct=round(100 * (1 - best["us"] / row["cublas_us"]), 2))
        row["cublas_tflops"] = round(flops / row["cublas_us"] / 1e6, 1)
        report["shapes"][name] = row
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"{'shape':6} {'K':>6} {'N':>6} {'cuBLAS us':>10} {'TF/s':>6} {'Lt pref':>8} {'Lt #0':>8} {'Lt best':>8} "
          f"{'rank':>4} {'gain %':>7} {'tried':>5}")
    step_gain = 0.0
    for name, row in report["shapes"].items():
        def cell(key):
            return f"{row[key]:8.1f}" if isinstance(row.get(key), float) else f"{'-':>8}"
        print(f"{name:6} {row['k']:6d} {row['n']:6d} {row['cublas_us']:10.1f} {row['cublas_tflops']:6.1f} "
              f"{cell('cublaslt_pref_us')} {cell('first_us')} {cell('best_us')} {row.get('best_rank', '-'):>4} "
              f"{row.get('gain_vs_cublas_pct', '-'):>7} {len(row['candidates']):5d}")
        if "best_us" in row:
            step_gain += PER_STEP * max(0.0, row["cublas_us"] - row["best_us"]) / 1e3
    print(f"best algorithms everywhere: -{step_gain:.2f} ms a step of 30 main blocks (bf16)")
    report["step_gain_ms"] = round(step_gain, 3)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
