"""GEMMs that finish the next kernel's work in their epilogue (Triton), for the block schedule (fastblocks.py,
switch `fused_gemms`):

    qkv_norm_rope   [q | k | v] = h Wqkvᵀ, and in the same tile the per-head RMSNorm + RoPE of q and k (a tile of
                    128 columns is one head): (3, rows, dim) bf16, q/k/v each in the (B, S, H, D) layout attention
                    reads. Replaces F.linear / fp8.scaled_mm + kernels.qk_norm_rope. bf16 or e4m3 operands.
    swiglu          silu(h W1ᵀ) * (h W3ᵀ): one A tile feeds two accumulators (w1's and w3's rows of the fused
                    weight, unchanged), and only the product is written: (rows, hidden) bf16. Replaces F.linear +
                    kernels.swiglu. bf16 operands (w2's fp8 input needs a scale per 10240-wide row, which no tile
                    sees).

Why (H100, 2026-12-07, Standard bf16): the GEMMs run at cuBLAS's floor, and what the step spends above it is the
row kernels between them (docs/PERFORMANCE.md). Per block, the SwiGLU kernel took 89 µs (it reads the 178 MB
w1/w3 output the GEMM has just written) and the q/k norm + RoPE kernel 49 µs: ~138 µs x 34 blocks x 8 steps =
~37 ms a generation, against ~1.5 ms of GEMM per block that a Triton GEMM must run within ~9 % of cuBLAS's rate
for the fusion to pay. bench/kernels.py times both against cuBLAS + the separate kernels and sweeps the tiles.

Numerics: the accumulator is rounded to bf16 first (what the unfused GEMM stores), then the epilogue computes in
float32 exactly as kernels.qk_norm_rope_reference / swiglu_reference do, and rounds once: the same math as the
unfused path up to the GEMM's summation order (tests/test_fused_gemm.py, Triton's interpreter on the CPU).
"""

from __future__ import annotations

import functools
import types

import torch

from . import fp8, kernels

# Launch parameters: bench/kernels.py --sweep times the alternatives on the device and writes the fastest (H100,
# Triton 3.6, 2026-12-07); bench/latency.py --kernel-config loads them. QKV's tile is one head wide (BN = head size).
CONFIG = {
    "qkv_gemm": {"BM": 256, "BK": 64, "GROUP_M": 8, "num_stages": 4, "num_warps": 8},
    "qkv_gemm_fp8": {"BM": 128, "BK": 128, "GROUP_M": 8, "num_stages": 4, "num_warps": 8},
    "swiglu_gemm": {"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8, "num_stages": 4, "num_warps": 8},
}

# Which GEMMs run fused under switch `fused_gemms` (measured end to end, H100, Triton 3.6, 2026-12-07, one engine):
# the SwiGLU one, bf16 97.0 -> 96.3 ms/step with latents bit-identical to cuBLAS + the row kernel; not the q/k/v ones,
# whose Triton GEMM runs under cuBLAS's by more than the q/k kernel it saves (fp8 68.5 -> 72.5 ms/step with both).
# bench/latency.py --kernel-config sets an entry with "use": {name: true/false}.
USE = {"qkv_gemm": False, "qkv_gemm_fp8": False, "swiglu_gemm": True}

_PLAIN, _SWIGLU, _QK = 0, 1, 2


def enabled(name: str) -> bool:
    """Whether GEMM `name` (a CONFIG key) runs fused when the schedule asks for fused GEMMs (USE)."""
    return USE.get(name, False)


@functools.lru_cache(maxsize=8)
def available(device: torch.device) -> bool:
    """The fused GEMMs can run on `device`: CUDA with Triton's tensor descriptors, compute capability 9.x-11.x (TMA and
    the ~228 KB of shared memory the tiles take; sm_120 cards have ~100 KB)."""
    if not kernels.available(device):
        return False
    try:
        _triton()
    except ImportError:
        return False
    return (9, 0) <= torch.cuda.get_device_capability(device) < (12, 0)


def qkv_norm_rope(h: torch.Tensor, h_scale: "torch.Tensor | None", weight: torch.Tensor,
                  weight_scale: "torch.Tensor | None", q_weight: torch.Tensor, k_weight: torch.Tensor,
                  freqs: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """h (rows, in) bf16, or e4m3 with row scales h_scale (rows, 1); weight (3 dim, in) = [Wq; Wk; Wv] (e4m3 with
    weight_scale (1, 3 dim) when h is e4m3); freqs (rows, head) float32 (cos, sin) pairs. Returns (3, rows, dim) bf16:
    RoPE(RMSNorm_head(q) * q_weight), the same for k, and v."""
    rows, dim = h.shape[0], weight.shape[0] // 3
    head = dim // heads
    out = torch.empty((3, rows, dim), dtype=torch.bfloat16, device=h.device)
    name = "qkv_gemm_fp8" if h_scale is not None else "qkv_gemm"
    _launch(_QK, dict(CONFIG[name], BN=head), h, h_scale, weight, weight_scale, out, 3 * dim,
            q_weight=q_weight, k_weight=k_weight, freqs=freqs, dim=dim, eps=eps)
    return out


def qkv_norm_rope_reference(h, h_scale, weight, weight_scale, q_weight, k_weight, freqs, heads, eps):
    """The unfused path: the GEMM (bf16 out), then kernels.qk_norm_rope's reference."""
    qkv = _gemm_reference(h, h_scale, weight, weight_scale)
    qk = kernels.qk_norm_rope_reference(qkv, q_weight, k_weight, freqs, heads, eps)
    return torch.cat([qk, qkv[:, 2 * qk.shape[-1]:].unsqueeze(0)])


def swiglu(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h (rows, in) bf16, weight (2 hidden, in) = [W1; W3] bf16 -> silu(h W1ᵀ) * (h W3ᵀ): (rows, hidden) bf16."""
    rows, hidden = h.shape[0], weight.shape[0] // 2
    out = torch.empty((rows, hidden), dtype=torch.bfloat16, device=h.device)
    _launch(_SWIGLU, CONFIG["swiglu_gemm"], h, None, weight, None, out, hidden)
    return out


def swiglu_reference(h, weight):
    return kernels.swiglu_reference(_gemm_reference(h, None, weight, None), quant=False)[0]


def gemm(h, h_scale, weight, weight_scale, config: dict) -> torch.Tensor:
    """The plain GEMM on the same kernel (bf16 out): bench/kernels.py's yardstick against cuBLAS."""
    out = torch.empty((h.shape[0], weight.shape[0]), dtype=torch.bfloat16, device=h.device)
    _launch(_PLAIN, config, h, h_scale, weight, weight_scale, out, weight.shape[0])
    return out


def _gemm_reference(h, h_scale, weight, weight_scale):
    if h_scale is None:
        return torch.nn.functional.linear(h, weight)
    return fp8.scaled_mm(h, h_scale, weight, weight_scale, None, torch.bfloat16)


def _launch(epilogue: int, config: dict, h, h_scale, weight, weight_scale, out, n_out: int, q_weight=None,
            k_weight=None, freqs=None, dim: int = 0, eps: float = 0.0) -> None:
    t = _triton()
    rows, k = h.shape
    bm, bn, bk = config["BM"], config["BN"], config["BK"]
    a_desc = t.TensorDescriptor.from_tensor(h, [bm, bk])
    b_desc = t.TensorDescriptor.from_tensor(weight, [bn, bk])
    scaled = h_scale is not None
    dummy = out
    grid = (t.triton.cdiv(rows, bm) * t.triton.cdiv(n_out, bn),)
    t.gemm_kernel[grid](
        a_desc, b_desc, h_scale if scaled else dummy, weight_scale if scaled else dummy, out,
        q_weight if q_weight is not None else dummy, k_weight if k_weight is not None else dummy,
        freqs if freqs is not None else dummy, rows, n_out, k, weight.shape[0] // 2, dim, eps,
        EPILOGUE=epilogue, SCALED=scaled, BM=bm, BN=bn, BK=bk, GROUP_M=config["GROUP_M"],
        UPCAST=h.dtype == torch.bfloat16 and kernels._interpreting(),
        num_stages=config["num_stages"], num_warps=config["num_warps"])


@functools.lru_cache(maxsize=1)
def _triton():
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def gemm_kernel(a_desc, b_desc, a_scale_ptr, b_scale_ptr, out_ptr, q_w_ptr, k_w_ptr, freqs_ptr, M, N, K, half,
                    dim, eps, EPILOGUE: tl.constexpr, SCALED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr):
        # Tiles in groups of GROUP_M rows of tiles, so the weight tiles a group reads stay in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group = tl.minimum(tiles_m - first_m, GROUP_M)
        off_m = (first_m + (pid % per_group) % group) * BM
        off_n = ((pid % per_group) // group) * BN

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc3 = tl.zeros((BM, BN), dtype=tl.float32)  # w3's accumulator (SwiGLU only; unused otherwise)
        for k in range(0, K, BK):
            a, b = a_desc.load([off_m, k]), b_desc.load([off_n, k])
            if UPCAST:  # Triton's CPU interpreter (3.9) multiplies bf16 dot operands wrongly; never on a GPU
                a, b = a.to(tl.float32), b.to(tl.float32)
            if SCALED:  # promote the e4m3 products into float32 every BK, as cuBLAS's _scaled_mm does by default
                acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=BK)
            else:
                acc = tl.dot(a, b.T, acc)
            if EPILOGUE == 1:
                b3 = b_desc.load([half + off_n, k])
                if UPCAST:
                    b3 = b3.to(tl.float32)
                acc3 = tl.dot(a, b3.T, acc3)

        r = off_m + tl.arange(0, BM)
        c = tl.arange(0, BN)
        rmask = (r < M)[:, None]
        if SCALED:  # e4m3 operands: the row scales of h times the weight's output-channel scales
            acc = acc * tl.load(a_scale_ptr + r, mask=r < M, other=0.0)[:, None]
            acc = acc * tl.load(b_scale_ptr + off_n + c, mask=off_n + c < N, other=0.0)[None, :]
        # The unfused GEMM's bf16 output, which the row kernels read.
        y = acc.to(tl.bfloat16).to(tl.float32)
        if EPILOGUE == 1:
            g = acc3.to(tl.bfloat16).to(tl.float32)
            y = y / (1.0 + tl.exp(-y)) * g
            tl.store(out_ptr + r[:, None].to(tl.int64) * N + (off_n + c)[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=rmask & (off_n + c < N)[None, :])
        elif EPILOGUE == 2:
            part = off_n // dim  # 0 q, 1 k, 2 v; a tile is one head
            which = tl.minimum(part, 1).to(tl.float32)
            w = tl.load(q_w_ptr + c).to(tl.float32) * (1.0 - which) + tl.load(k_w_ptr + c).to(tl.float32) * which
            normed = y * tl.rsqrt(tl.sum(y * y, axis=1) / BN + eps)[:, None] * w[None, :]
            f = tl.load(freqs_ptr + r[:, None].to(tl.int64) * BN + c[None, :], mask=rmask, other=0.0)
            cos, sin = tl.split(tl.reshape(f, (BM, BN // 2, 2)))
            v0, v1 = tl.split(tl.reshape(normed, (BM, BN // 2, 2)))
            roped = tl.reshape(tl.join(v0 * cos - v1 * sin, v0 * sin + v1 * cos), (BM, BN))
            y = tl.where(part < 2, roped, y)
            dst = out_ptr + part.to(tl.int64) * M * dim + r[:, None].to(tl.int64) * dim + (off_n - part * dim + c)[None, :]
            tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=rmask)
        else:
            tl.store(out_ptr + r[:, None].to(tl.int64) * N + (off_n + c)[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=rmask & (off_n + c < N)[None, :])

    return types.SimpleNamespace(triton=triton, gemm_kernel=gemm_kernel, TensorDescriptor=TensorDescriptor)
