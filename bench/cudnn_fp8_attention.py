#!/usr/bin/env python3
"""cuDNN FP8 (e4m3) fused attention forward vs bf16 attention at the Z-Image DiT shape.

B=1, H=30, D=128, no mask, not causal, scale 1/sqrt(128), S = 4352, 6656, 9472 (if time allows); q/k/v
held as (B,S,H,D) like the engine. Candidates per S:
  torch_sdpa_bf16  torch SDPA, only SDPBackend.CUDNN_ATTENTION, on (B,H,S,D) transposed views
  fe_bf16          cudnn-frontend graph `sdpa`, bf16 in/out (harness check)
  fe_fp8_bf16out   cudnn-frontend `sdpa_fp8`, e4m3 q/k/v, bf16 O (the frontend's support check allows
                   this on Blackwell only, so on H100 it is expected to record an error)
  fe_fp8_fp8out    `sdpa_fp8`, e4m3 O with scale_o = 448/amax_o of a first run, dequantized to bf16
Scales: per tensor, scale = 448/amax, descale = 1/scale; softmax P: scale_s = 448, descale_s = 1/448.
Reported: median us of the attention call alone (CUDA events, 10 warm-up, 50 timed), TFLOP/s (4*B*H*S*S*D),
rel-L2 vs a float32 torch reference for q,k,v ~ N(0,1) ("randn") and with q,k rows at unit RMS
("rmsnorm_qk"); separately, the unfused torch cost of quantizing q,k,v (amax, scale, cast) and of
dequantizing O; fp8_total_us = quant + attention (+ dequant).

Run:  python3 bench/cudnn_fp8_attention.py --out $OUT/cudnn-fp8.json
"""
import argparse
import json
import math
import statistics
import time

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zimage.cudnn_attention import build  # noqa: E402

B, H, D = 1, 30, 128
SCALE = 1.0 / math.sqrt(D)
FP8, FP8_MAX = torch.float8_e4m3fn, 448.0
CASES = ("randn", "rmsnorm_qk")


def err_str(e):
    return f"{type(e).__name__}: {e}".strip()[:600]


TORCH_CUDNN_VERSION = torch.backends.cudnn.version()  # loads torch's libcudnn before the frontend looks for one
try:
    import cudnn  # pip: nvidia-cudnn-frontend
    CUDNN_IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001 - record it and still run the torch candidate
    cudnn, CUDNN_IMPORT_ERROR = None, err_str(e)


def time_us(fn, warmup=10, iters=50):
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)


def make_inputs(S, case, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", generator=gen) for _ in range(3))
    if case == "rmsnorm_qk":
        q, k = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) for x in (q, k))
    return tuple(x.to(torch.bfloat16) for x in (q, k, v))


def reference_fp32(q, k, v, chunk=1024):
    """softmax(q k^T * scale) v in float32, chunked over query rows; returns (B,S,H,D)."""
    qf, kf, vf = (x.transpose(1, 2).float() for x in (q, k, v))
    out = torch.empty_like(qf)
    for i in range(0, qf.shape[2], chunk):
        s = torch.matmul(qf[:, :, i:i + chunk], kf.transpose(-1, -2)).mul_(SCALE)
        out[:, :, i:i + chunk] = torch.matmul(torch.softmax(s, dim=-1), vf)
    return out.transpose(1, 2)


def rel_l2(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def quantize_fp8(x):
    """Per-tensor e4m3 quantization with plain torch ops: returns (x_fp8, descale (1,1,1,1) fp32)."""
    lo, hi = torch.aminmax(x)
    amax = torch.maximum(lo.abs(), hi).float().clamp_(min=1e-12).reshape(1, 1, 1, 1)
    scale = FP8_MAX / amax
    return (x * scale).to(FP8), 1.0 / scale  # bf16 * fp32 (1,1,1,1) computes in fp32


def scalar(val):
    return torch.full((1, 1, 1, 1), val, dtype=torch.float32, device="cuda")


def torch_sdpa_bind(q, k, v):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    box = {}
    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            box["o"] = F.scaled_dot_product_attention(qt, kt, vt, scale=SCALE)
    run()
    return run, lambda: box["o"].transpose(1, 2), {}


class FrontendSDPA:
    """One cudnn-frontend SDPA graph over BSHD memory (logical BHSD dims), built the way
    NVIDIA/cudnn-frontend test/python/sdpa/fp8.py (generate_graph_fwd, exec_sdpa_fp8) does."""

    def __init__(self, handle, S, fp8, out_dtype):
        self.handle, self.S, self.fp8, self.out_dtype = handle, S, fp8, out_dtype
        errors = []
        for gen_stats in (False, True):  # inference first; fall back to also writing softmax stats
            try:
                self._build(gen_stats)
                self.generate_stats = gen_stats
                return
            except Exception as e:  # noqa: BLE001
                errors.append(f"generate_stats={gen_stats}: {err_str(e)}")
        raise RuntimeError(" | ".join(errors))

    def _build(self, gen_stats):
        S, fl, one = self.S, cudnn.data_type.FLOAT, [1, 1, 1, 1]
        io = cudnn.data_type.FP8_E4M3 if self.fp8 else cudnn.data_type.BFLOAT16
        out_type = cudnn.data_type.FP8_E4M3 if self.out_dtype == FP8 else cudnn.data_type.BFLOAT16
        dims, strides = [B, H, S, D], [S * H * D, D, H * D, 1]  # (B,H,S,D) dims over (B,S,H,D) memory
        g = cudnn.pygraph(io_data_type=io, intermediate_data_type=fl, compute_data_type=fl, handle=self.handle)
        t = {n: g.tensor(name=n, dim=dims, stride=strides, data_type=io) for n in ("q", "k", "v")}
        if self.fp8:
            for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
                t[n] = g.tensor(name=n, dim=one, stride=one, data_type=fl)
            o, stats, t["amax_s"], t["amax_o"] = g.sdpa_fp8(
                q=t["q"], k=t["k"], v=t["v"],
                descale_q=t["descale_q"], descale_k=t["descale_k"], descale_v=t["descale_v"],
                descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
                generate_stats=gen_stats, attn_scale=SCALE, name="sdpa_fp8")
            for n in ("amax_s", "amax_o"):
                t[n].set_output(True).set_dim(one).set_stride(one).set_data_type(fl)
        else:
            o, stats = g.sdpa(q=t["q"], k=t["k"], v=t["v"], generate_stats=gen_stats, attn_scale=SCALE, name="sdpa")
        o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(out_type)
        t["o"] = o
        if gen_stats:
            stats.set_output(True).set_dim([B, H, S, 1]).set_stride([H * S, S, 1, 1]).set_data_type(fl)
            t["stats"] = stats
        self.graph, self.t = g, t
        self.workspace = build(g, "cuda")

    def bind(self, q, k, v):
        """Returns (run, output, info) for bf16 BSHD q, k, v; run() is the attention call alone."""
        t, fp8_out = self.t, self.out_dtype == FP8
        o = torch.empty(B, self.S, H, D, dtype=self.out_dtype, device="cuda")
        pack = {t["o"]: o}
        if "stats" in t:
            pack[t["stats"]] = torch.empty(B, H, self.S, 1, dtype=torch.float32, device="cuda")
        if not self.fp8:
            pack.update({t["q"]: q, t["k"]: k, t["v"]: v})
        else:
            (qq, dq), (kq, dk), (vq, dv) = (quantize_fp8(x) for x in (q, k, v))
            # |O| <= amax(v), so 448/amax_v (= 1/descale_v) cannot overflow a first fp8-output run;
            # it is then replaced by 448/amax_o of that run (amax_o is taken before scale_o).
            scale_o = (1.0 / dv).contiguous() if fp8_out else scalar(1.0)
            amax_s, amax_o = scalar(0.0), scalar(0.0)
            pack.update({t["q"]: qq, t["k"]: kq, t["v"]: vq, t["descale_q"]: dq, t["descale_k"]: dk,
                         t["descale_v"]: dv, t["scale_s"]: scalar(FP8_MAX), t["descale_s"]: scalar(1.0 / FP8_MAX),
                         t["scale_o"]: scale_o, t["amax_s"]: amax_s, t["amax_o"]: amax_o})
        def run():
            self.graph.execute(pack, self.workspace, handle=self.handle)
        run()
        info = {}
        if self.fp8:
            if fp8_out:  # keep the first scale_o if amax_o came back unusable
                new_scale = FP8_MAX / amax_o
                scale_o.copy_(torch.where(torch.isfinite(new_scale) & (amax_o > 0), new_scale, scale_o))
                run()
            torch.cuda.synchronize()
            info = {n: x.item() for n, x in (("amax_s", amax_s), ("amax_o", amax_o), ("scale_o", scale_o),
                                             ("descale_q", dq), ("descale_k", dk), ("descale_v", dv))}
        if fp8_out:
            descale_o = 1.0 / scale_o
            return run, lambda: o.to(torch.bfloat16).mul_(descale_o), info
        return run, lambda: o, info


CANDIDATES = [("torch_sdpa_bf16", None), ("fe_bf16", (False, torch.bfloat16)),  # spec: (fp8 inputs, O dtype)
              ("fe_fp8_bf16out", (True, torch.bfloat16)), ("fe_fp8_fp8out", (True, FP8))]


def bench_candidate(S, spec, handle, inputs, refs, flops):
    res = {"us": None, "tflops": None, "rel_l2": {}, "error": None}
    try:
        bind = torch_sdpa_bind
        if spec is not None:
            if cudnn is None:
                raise RuntimeError(f"import cudnn failed: {CUDNN_IMPORT_ERROR}")
            t_build = time.time()
            graph = FrontendSDPA(handle, S, *spec)
            res["build_s"], res["generate_stats"] = round(time.time() - t_build, 3), graph.generate_stats
            bind = graph.bind
        for case in CASES:
            run, output, info = bind(*inputs[case])
            res["rel_l2"][case] = rel_l2(output(), refs[case])
            if info:
                res.setdefault("scales", {})[case] = info
            if case == "randn":
                res["us"] = time_us(run)
                res["tflops"] = flops / res["us"] / 1e6
                if spec is not None and spec[1] == FP8:
                    res["dequant_o_us"] = time_us(output)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - one failing candidate must not stop the others
        res["error"] = err_str(e)
    return res


def bench_seq_len(S, handle):
    flops = 4 * B * H * S * S * D
    inputs = {case: make_inputs(S, case, seed=S) for case in CASES}
    refs = {case: reference_fp32(*inputs[case]) for case in CASES}
    row = {"seq_len": S, "flops": flops,
           "candidates": {name: bench_candidate(S, spec, handle, inputs, refs, flops) for name, spec in CANDIDATES}}
    try:
        q, k, v = inputs["randn"]
        row["quant_qkv_us"] = time_us(lambda: [quantize_fp8(x) for x in (q, k, v)])
        row["quant_min_bytes"] = 3 * q.numel() * 5  # fused lower bound: read bf16 twice (amax, cast) + write fp8
    except Exception as e:  # noqa: BLE001
        row["quant_error"] = err_str(e)
    base = row["candidates"]["torch_sdpa_bf16"]["us"]
    for name in ("fe_fp8_bf16out", "fe_fp8_fp8out"):
        res = row["candidates"][name]
        if res["us"] is not None and "quant_qkv_us" in row:
            res["fp8_total_us"] = res["us"] + row["quant_qkv_us"] + res.get("dequant_o_us", 0.0)
            if base:
                res["speedup_attn_only"] = base / res["us"]
                res["speedup_with_quant"] = base / res["fp8_total_us"]
    return row


def print_row(row):
    S = row["seq_len"]
    for name, r in row["candidates"].items():
        us = f"{r['us']:9.1f} {r['tflops']:7.1f}" if r["us"] is not None else f"{'-':>9} {'-':>7}"
        rl = "  ".join(f"{r['rel_l2'].get(c, float('nan')):11.2e}" for c in CASES)
        total = f"total with quant/dequant {r['fp8_total_us']:.1f} us" if "fp8_total_us" in r else ""
        print(f"{S:6d} {name:16s} {us}  {rl}  {(r['error'] or '')[:110] or total}", flush=True)
    if "quant_qkv_us" in row:
        print(f"{S:6d} quant q,k,v (unfused torch ops): {row['quant_qkv_us']:.1f} us", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="cudnn_fp8_attention.json")
    ap.add_argument("--seqlens", default="4352,6656,9472")
    ap.add_argument("--budget-s", type=float, default=35.0, help="skip the remaining sequence lengths after this")
    args = ap.parse_args()
    t0 = time.time()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the float32 reference
    meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
            "cudnn_torch": TORCH_CUDNN_VERSION, "shape": {"B": B, "H": H, "D": D, "scale": SCALE},
            "timing": "CUDA events, 10 warm-up, median of 50", "cudnn_import_error": CUDNN_IMPORT_ERROR}
    handle = None
    if cudnn is not None:
        try:
            meta["cudnn_frontend"] = getattr(cudnn, "__version__", None)
            meta["cudnn_backend"] = cudnn.backend_version()
            meta["cudnn_backend_string"] = getattr(cudnn, "backend_version_string", lambda: None)()
            handle = cudnn.create_handle()
            cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        except Exception as e:  # noqa: BLE001
            meta["cudnn_setup_error"] = err_str(e)
    print(f"torch {meta['torch']} (cuda {meta['cuda']}), torch.backends.cudnn.version()={TORCH_CUDNN_VERSION}, "
          f"cudnn.backend_version()={meta.get('cudnn_backend')} ({meta.get('cudnn_backend_string')}), "
          f"cudnn-frontend {meta.get('cudnn_frontend')}, {meta['gpu']}", flush=True)
    print(f"{'S':>6} {'candidate':16s} {'us':>9} {'TFLOP/s':>7}  {'relL2 randn':>11}  {'relL2 rms':>11}  note")
    results = []
    for S in (int(x) for x in args.seqlens.split(",") if x.strip()):
        if time.time() - t0 > args.budget_s:
            results.append({"seq_len": S, "skipped": f"time budget {args.budget_s}s spent"})
            print(f"{S:6d} skipped (time budget)", flush=True)
            continue
        try:
            results.append(bench_seq_len(S, handle))
            print_row(results[-1])
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - e.g. a sticky CUDA error; still write what we have
            results.append({"seq_len": S, "error": err_str(e)})
            print(f"{S:6d} failed: {err_str(e)}", flush=True)
    meta["elapsed_s"] = round(time.time() - t0, 2)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.out} ({meta['elapsed_s']} s)")


if __name__ == "__main__":
    main()
