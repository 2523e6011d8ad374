"""Check and time the hand-written kernel (zimage/kernels.py) against the code it replaces, on a CUDA GPU.

    python bench/kernels.py --out kernels.json

Shape: one Standard 1024^2 block (4352 tokens = 4096 image + 256 caption; SwiGLU 2 x 10240), the input laid out
as the fused w1/w3 GEMM leaves it. The kernel against its PyTorch reference, eager and compiled (what the engine
ran before): agreement (fp8 codes equal, scales) and time per call (CUDA events, median of 5 x 100 calls), with
the byte floor at the measured copy bandwidth. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from zimage import kernels  # noqa: E402


def time_ms(fn, repeats: int = 5, calls: int = 100) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4352)
    ap.add_argument("--out", default="kernels.json")
    args = ap.parse_args(argv)
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

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_bandwidth_gbs": round(bandwidth / 1e9, 1), "kernels": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'kernel':<14} {'ours us':>8} {'compiled ref us':>15} {'floor us':>8}  agreement")
    for r in rows:
        agreement = {k: round(v, 6) for k, v in r.items() if k.startswith(("rel_l2", "max_abs", "fp8", "scale"))}
        print(f"{r['kernel']:<14} {r['kernel_us']:>8.1f} {r['compiled_reference_us']:>15.1f} {r['floor_us']:>8.1f}  "
              f"{agreement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
