"""Check and time the hand-written kernels (zimage/kernels.py) against the code they replace, on a CUDA GPU.

    python bench/kernels.py --out kernels.json [--sweep] [--gemms | --gemms-only]

Shape: one Standard 1024^2 block (4352 tokens = 4096 image + 256 caption; dim 3840, 30 heads of 128; SwiGLU
2 x 10240), inputs laid out as the fused GEMMs leave them. Each kernel against its PyTorch reference, eager and
compiled (what Inductor makes of the same math): agreement (rel-L2; fp8 codes equal) and time per call (CUDA
events, median of 5 x 100 calls), with the byte floor at the measured copy bandwidth. `--sweep` also times each
kernel's launch parameters and writes the fastest as `best_config` (bench/latency.py --kernel-config reads it).
`--gemms` adds the GEMMs with epilogues (zimage/fused_gemm.py) against cuBLAS + the row kernels they replace, and
Triton's plain GEMM against cuBLAS's (TFLOP/s); `--gemms-only` times only those.
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from zimage import fp8, kernels  # noqa: E402


def time_ms(fn, repeats: int = 5, calls: int = 100) -> float:
    """GPU time per call: `calls` calls captured in one CUDA graph and replayed, so a kernel shorter than its
    Python launch is timed as the GPU runs it in the engine's graphs (plain calls when capture fails)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    run = lambda: [fn() for _ in range(calls)]  # noqa: E731
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    except Exception as exc:  # noqa: BLE001 - e.g. a compiled reference that syncs
        print(f"timing without a CUDA graph ({exc!r})"[:160], flush=True)
        torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write), the floor's yardstick."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), calls=20)
    return 2 * a.numel() / (ms / 1e3)


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _dense(out):
    """A kernel's result as one float tensor: (x', y, y_scale) / (q, scale) pairs dequantized and concatenated."""
    if isinstance(out, torch.Tensor):
        return out.float().flatten()
    parts = [t for t in out if t is not None]
    if len(parts) >= 2 and parts[-1].dtype == torch.float32 and parts[-1].shape[-1] == 1:
        parts = parts[:-2] + [parts[-2].float() * parts[-1]]
    return torch.cat([t.float().flatten() for t in parts])


def _grid(grid: dict) -> list[dict]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def sweep_launches(config: dict, key: str, grid: dict, call, calls: int) -> list[tuple[float, dict]]:
    """(µs per call, parameters) for each launch-parameter set of `grid` tried on config[key]; config is restored."""
    default, trials = dict(config[key]), []
    for params in _grid(grid):
        config[key] = {**default, **params}
        try:
            trials.append((1e3 * time_ms(call, repeats=3, calls=calls), params))
        except Exception as exc:  # noqa: BLE001 - a parameter set Triton refuses (registers, shared memory)
            print(f"{key} {params}: {exc!r}"[:200], flush=True)
    config[key] = default
    return trials


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4352)
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--sweep", action="store_true", help="time each kernel's launch parameters; keep the fastest")
    ap.add_argument("--gemms", action="store_true", help="also the GEMMs with epilogues (zimage/fused_gemm.py)")
    ap.add_argument("--gemms-only", action="store_true", help="only the GEMMs with epilogues")
    args = ap.parse_args(argv)
    if args.gemms_only:
        bandwidth = copy_bandwidth()
        rows, best = bench_gemms(args.tokens, args.sweep)
        return report(args, rows, best, bandwidth)
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    s, hidden = args.tokens, 10240
    bandwidth = copy_bandwidth()
    rows = []

    h = torch.randn(s, 2 * hidden, device=dev, dtype=bf16) * 2
    compiled_swiglu = torch.compile(kernels.swiglu_quant_reference, dynamic=False)
    ref_q, ref_scale = kernels.swiglu_quant_reference(h)
    got_q, got_scale = kernels.swiglu_quant(h)
    comp_q, _ = compiled_swiglu(h)
    moved = h.numel() * 2 + s * hidden + s * 4
    rows.append({"kernel": "swiglu_quant", "shape": list(h.shape),
                 "fp8_codes_equal": float((got_q.view(torch.uint8) == ref_q.view(torch.uint8)).float().mean()),
                 "fp8_codes_equal_compiled_vs_eager": float((comp_q.view(torch.uint8) == ref_q.view(torch.uint8))
                                                            .float().mean()),
                 "scale_rel_err": float(((got_scale - ref_scale).abs() / ref_scale).max()),
                 "rel_l2_dequantized": rel_l2(got_q.float() * got_scale, ref_q.float() * ref_scale),
                 "kernel_us": 1e3 * time_ms(lambda: kernels.swiglu_quant(h)),
                 "compiled_reference_us": 1e3 * time_ms(lambda: compiled_swiglu(h)),
                 "floor_us": 1e6 * moved / bandwidth})

    # The block schedule's kernels (fastblocks.py): fp8 and bf16 outputs.
    dim, heads, head = 3840, 30, 128
    x, branch = torch.randn(s, dim, device=dev, dtype=bf16), torch.randn(s, dim, device=dev, dtype=bf16)
    mod = torch.randn(1, 4 * dim, device=dev, dtype=bf16)
    w_a, w_b = torch.rand(dim, device=dev, dtype=bf16) + 0.5, torch.rand(dim, device=dev, dtype=bf16) + 0.5
    qkv = torch.randn(s, 3 * dim, device=dev, dtype=bf16)
    angles = torch.rand(s, head // 2, device=dev) * 6.28
    freqs = torch.stack((angles.cos(), angles.sin()), dim=-1).reshape(s, head)
    q_w, k_w = torch.rand(head, device=dev, dtype=bf16) + 0.5, torch.rand(head, device=dev, dtype=bf16) + 0.5
    attn_out = torch.randn(1, heads, s, head, device=dev, dtype=bf16).transpose(1, 2)  # SDPA's BHSD, seen as BSHD
    attn_out_fa4 = attn_out.contiguous()  # FlashAttention-4's BSHD
    e4m3 = 1  # bytes
    cases = {
        # name: (kernel call, reference, bytes moved, sweep parameter grid)
        "residual_norm fp8": (
            lambda: kernels.residual_norm(x, s, 1e-5, branch, w_a, mod[:, dim:2 * dim], w_b, mod[:, :dim], True),
            lambda: kernels.residual_norm_reference(x, s, 1e-5, branch, w_a, mod[:, dim:2 * dim], w_b, mod[:, :dim],
                                                    True),
            s * dim * (2 + 2 + 2 + e4m3), {"rows": [1, 2, 4], "num_warps": [2, 4, 8]}),
        "residual_norm bf16": (
            lambda: kernels.residual_norm(x, s, 1e-5, branch, w_a, mod[:, dim:2 * dim], w_b, mod[:, :dim], False),
            lambda: kernels.residual_norm_reference(x, s, 1e-5, branch, w_a, mod[:, dim:2 * dim], w_b, mod[:, :dim],
                                                    False),
            s * dim * 8, None),
        "norm fp8 (first block)": (
            lambda: kernels.residual_norm(x, s, 1e-5, weight=w_b, scale=mod[:, :dim], quant=True),
            lambda: kernels.residual_norm_reference(x, s, 1e-5, weight=w_b, scale=mod[:, :dim], quant=True),
            s * dim * (2 + e4m3), None),
        "residual only (last block)": (
            lambda: kernels.residual_norm(x, s, 1e-5, branch, w_a, mod[:, dim:2 * dim]),
            lambda: kernels.residual_norm_reference(x, s, 1e-5, branch, w_a, mod[:, dim:2 * dim]),
            s * dim * 6, None),
        "qk_norm_rope": (
            lambda: kernels.qk_norm_rope(qkv, q_w, k_w, freqs, heads, 1e-5),
            lambda: kernels.qk_norm_rope_reference(qkv, q_w, k_w, freqs, heads, 1e-5),
            s * dim * 2 * 4 + s * head * 4,
            {"rows": [8, 16, 32], "heads": [1, 2, 5], "num_warps": [2, 4]}),
        "quantize_heads (SDPA layout)": (
            lambda: kernels.quantize_heads(attn_out),
            lambda: fp8.quantize_rows(attn_out.reshape(s, dim)),
            s * dim * (2 + e4m3), {"num_warps": [1, 2, 4, 8]}),
        "quantize_heads (FA4 layout)": (
            lambda: kernels.quantize_heads(attn_out_fa4),
            lambda: fp8.quantize_rows(attn_out_fa4.reshape(s, dim)),
            s * dim * (2 + e4m3), None),
        "swiglu fp8": (
            lambda: kernels.swiglu(h, True), lambda: kernels.swiglu_reference(h, True),
            s * hidden * (4 + e4m3), {"num_warps": [16, 32]}),
        "swiglu bf16": (
            lambda: kernels.swiglu(h, False), lambda: kernels.swiglu_reference(h, False),
            s * hidden * 6, None),
    }
    best = {}
    if args.gemms:
        rows, best = bench_gemms(args.tokens, args.sweep)
    for name, (call, reference, moved, grid) in cases.items():
        got, ref = _dense(call()), _dense(reference())
        compiled = torch.compile(reference, dynamic=False)
        row = {"kernel": name, "rel_l2": rel_l2(got, ref),
               "kernel_us": 1e3 * time_ms(call), "compiled_reference_us": 1e3 * time_ms(compiled),
               "floor_us": 1e6 * moved / bandwidth}
        if args.sweep and grid:
            key = name.split(" ")[0]
            trials = sweep_launches(kernels.CONFIG, key, grid, call, calls=50)
            fastest = min(trials, key=lambda t: t[0])
            row["sweep"] = [{"us": round(us, 2), **params} for us, params in trials]
            best[key] = fastest[1]
            row["best_us"], row["best"] = fastest
        rows.append(row)
    return report(args, rows, best, bandwidth)


def report(args, rows: list, best: dict, bandwidth: float) -> int:
    from zimage import fused_gemm

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_bandwidth_gbs": round(bandwidth / 1e9, 1), "kernels": rows,
              "config": {**kernels.CONFIG, **fused_gemm.CONFIG}, "best_config": best}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'kernel':<28} {'ours us':>8} {'best us':>8} {'compiled ref us':>15} {'floor us':>8}  agreement")
    for r in rows:
        agreement = {k: round(v, 6) for k, v in r.items() if k.startswith(("rel_l2", "max_abs", "fp8", "scale"))}
        best_us = f"{r['best_us']:>8.1f}" if "best_us" in r else f"{'':>8}"
        if "error" in r:
            print(f"{r['kernel']:<28} failed: {r['error']}")
            continue
        if "unfused_us" in r:  # a GEMM: against cuBLAS (+ the row kernel it replaces) instead of a compiled reference
            print(f"{r['kernel']:<28} {r['kernel_us']:>8.1f} {best_us} {'unfused/cuBLAS ' + format(r['unfused_us'], '.1f'):>15} "
                  f"{r['tflops']:>6.0f} TF/s  {agreement} {r.get('best', '')}")
            continue
        print(f"{r['kernel']:<28} {r['kernel_us']:>8.1f} {best_us} {r['compiled_reference_us']:>15.1f} "
              f"{r['floor_us']:>8.1f}  {agreement} {r.get('best', '')}")
    print(f"best launch parameters: {best}")
    return 0


def bench_gemms(s: int, sweep: bool) -> tuple[list, dict]:
    """The fused GEMMs of one Standard block against what they replace: cuBLAS's GEMM (F.linear / fp8.scaled_mm) plus
    the row kernel (kernels.qk_norm_rope, kernels.swiglu). `kernel_us` is ours, `unfused_us` theirs; with `sweep`,
    each tile configuration is timed and the fastest kept (best_config)."""
    import torch.nn.functional as F

    from zimage import fused_gemm

    dev, bf16 = "cuda", torch.bfloat16
    dim, heads, head, hidden = 3840, 30, 128, 10240
    h = torch.randn(s, dim, device=dev, dtype=bf16)
    wqkv = (torch.randn(3 * dim, dim, device=dev) / dim ** 0.5).to(bf16)
    w13 = (torch.randn(2 * hidden, dim, device=dev) / dim ** 0.5).to(bf16)
    hq, h_scale = fp8.quantize_rows(h)
    wq, w_scale = fp8.quantize_rows(wqkv)
    w_scale = w_scale.reshape(1, -1).contiguous()
    q_w, k_w = torch.rand(head, device=dev, dtype=bf16) + 0.5, torch.rand(head, device=dev, dtype=bf16) + 0.5
    angles = torch.rand(s, head // 2, device=dev) * 6.28
    freqs = torch.stack((angles.cos(), angles.sin()), dim=-1).reshape(s, head)
    qkv_flops, w13_flops = 2 * s * dim * 3 * dim, 2 * s * dim * 2 * hidden
    plain = {"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8, "num_stages": 4, "num_warps": 8}
    cases = {
        # name: (ours, unfused, reference for agreement, FLOPs, config key, sweep grid)
        "qkv_gemm": (
            lambda: fused_gemm.qkv_norm_rope(h, None, wqkv, None, q_w, k_w, freqs, heads, 1e-5),
            lambda: kernels.qk_norm_rope(F.linear(h, wqkv), q_w, k_w, freqs, heads, 1e-5),
            lambda: fused_gemm.qkv_norm_rope_reference(h, None, wqkv, None, q_w, k_w, freqs, heads, 1e-5),
            qkv_flops, {"BM": [128, 256], "BK": [64, 128], "num_stages": [3, 4], "num_warps": [8]}),
        "qkv_gemm_fp8": (
            lambda: fused_gemm.qkv_norm_rope(hq, h_scale, wq, w_scale, q_w, k_w, freqs, heads, 1e-5),
            lambda: kernels.qk_norm_rope(fp8.scaled_mm(hq, h_scale, wq, w_scale, None, bf16), q_w, k_w, freqs, heads,
                                         1e-5),
            lambda: fused_gemm.qkv_norm_rope_reference(hq, h_scale, wq, w_scale, q_w, k_w, freqs, heads, 1e-5),
            qkv_flops, {"BM": [128, 256], "BK": [128], "num_stages": [3, 4], "num_warps": [8]}),
        "swiglu_gemm": (
            lambda: fused_gemm.swiglu(h, w13),
            lambda: kernels.swiglu(F.linear(h, w13), quant=False),
            lambda: fused_gemm.swiglu_reference(h, w13),
            w13_flops, {"BM": [128], "BN": [64, 128], "BK": [64], "num_stages": [3, 4], "num_warps": [8]}),
        "plain w1/w3 GEMM (Triton)": (
            lambda: fused_gemm.gemm(h, None, w13, None, plain), lambda: F.linear(h, w13), lambda: F.linear(h, w13),
            w13_flops, None),
    }
    rows, best = [], {}
    for name, (ours, unfused, reference, flops, grid) in cases.items():
        try:
            row = {"kernel": name, "rel_l2": rel_l2(ours(), reference()), "kernel_us": 1e3 * time_ms(ours),
                   "unfused_us": 1e3 * time_ms(unfused)}
        except Exception as exc:  # noqa: BLE001 - keep the other cases (a Triton without TMA descriptors, ...)
            print(f"{name}: {exc!r}"[:300], flush=True)
            rows.append({"kernel": name, "error": repr(exc)[:300]})
            continue
        row["tflops"] = flops / (row["kernel_us"] * 1e-6) / 1e12
        if sweep and grid:
            trials = sweep_launches(fused_gemm.CONFIG, name, grid, ours, calls=20)
            if trials:
                fastest = min(trials, key=lambda t: t[0])
                row["sweep"] = [{"us": round(us, 2), **params} for us, params in trials]
                best[name] = fastest[1]
                row["best_us"], row["best"] = fastest
                row["tflops"] = flops / (fastest[0] * 1e-6) / 1e12
        print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), flush=True)
        rows.append(row)
    return rows, best


if __name__ == "__main__":
    sys.exit(main())
