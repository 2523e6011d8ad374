"""Hand-written Triton kernels for the DiT block's non-GEMM work, each with the PyTorch reference it must equal.

Two users: the SwiGLU + fp8 quantization op below (`zimage::swiglu_quant`, called from the compiled FFN when the
`fused_kernels` switch is on), and the block schedule of fastblocks.py (switch `block_kernels`), which runs the
main blocks on these kernels and the GEMMs without Inductor:

    residual_norm   x + tanh(gate) * RMSNorm(branch) (the residual), then RMSNorm(x) * (1 + scale) quantized to
                    e4m3 per row for the next GEMM (or bf16); either half alone too. One read of each row.
    qk_norm_rope    the q and k heads of the fused q/k/v GEMM's output: per-head RMSNorm, then RoPE, written as
                    (2, rows, dim) bf16 -- q and k in the (B, S, H, D) layout attention reads.
    qkv_e4m3        qk_norm_rope's q and k, and v, as e4m3 with one scale per tensor: cuDNN's 8-bit attention's
                    operands (cudnn_attention.py), and the scale its e4m3 output is written in (from v's).
    quantize_heads  the attention output (B, S, H, D), any strides, quantized per row for to_out's fp8 GEMM.
    swiglu          silu(h1) * h3 of the fused w1/w3 output, quantized per row (or bf16).

The references compute in float32 and round only what they store; the kernels do the same, so they agree to
float32 rounding (tests/test_kernels.py, through Triton's interpreter on the CPU where Triton is installed;
bench/kernels.py on the GPU). The references are what a CPU runs.

The SwiGLU op in detail:

Measured on the H100 (2026-11-25, Standard 1024^2, fp8; bench/kernels.py and bench/latency.py): Inductor's kernel
for `quantize_rows(silu(h1) * h3)` -- w2's fp8 input -- took 148 us a call (38 ms a generation, 8 steps x 34
blocks) for ~218 MB of reads and writes (75 us at the measured 2.98 TB/s): its looped reduction reads each
10240-wide row twice (the row's amax, then the quantization). `swiglu_quant` keeps the row in registers: one read
of both halves, one write of the e4m3 values and the row's scale; 87 us alone, 84 us a call in the engine.

It reproduces the PyTorch code it replaces operation for operation, including its bf16 roundings (`F.silu(h1)`
rounds to bf16, so does the product), so the fp8 codes equal the eager reference's (all but 3 in 10^6 on the
device, from float32 exp/division rounding; the compiled reference itself differs from eager in 3 % of codes).

The op is a `torch.library.custom_op` (opaque to Inductor, traced through its fake): the Triton kernel for bf16
CUDA input, the PyTorch reference otherwise -- which is what the CPU tests compare against the code it replaces.
(As a `torch.library.triton_op`, which Inductor would launch from its own generated code, Inductor's compile
worker failed to build the kernel on the device's torch 2.11; not pursued.)

Off by default (speed switch `fused_kernels`): in the engine the kernel saved 7 ms of GPU time a generation, but
the Python call between compiled kernels idled the GPU as long (74.3 ms/step either way); with the blocks as one
CUDA graph (`block_graphs`) it gained 1 ms/step (docs/PERFORMANCE.md, 2026-11-25).

Tried and dropped (same measurements): q/k RMSNorm + RoPE as one kernel per token -- 325 us a call against the
compiled reference's 80 us (its interleaved stride-2 loads and stores of 30 x 64 pairs per program were the wrong
shape); Inductor's own kernel for it stays.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from . import fp8

# Launch parameters per kernel: the fastest of bench/kernels.py --sweep on the H100 (2026-11-25); a module-level
# table so the benchmark can try others.
CONFIG = {
    "residual_norm": {"rows": 1, "num_warps": 8},
    "qk_norm_rope": {"rows": 16, "heads": 1, "num_warps": 2},
    "quantize_heads": {"num_warps": 4},
    "swiglu": {"num_warps": 32},
}


def available(device) -> bool:
    """The Triton kernels can run for tensors on `device` (a CUDA device and an importable Triton)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        _triton()
    except ImportError:
        return False
    return True


def _use_triton(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda for t in tensors) or _interpreting()


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


# ---- residual + RMSNorm + modulation (+ fp8) -----------------------------------------------------------------
def residual_norm(x: torch.Tensor, seq: int, eps: float, branch=None, branch_weight=None, gate=None,
                  weight=None, scale=None, quant: bool = False):
    """On rows x (B*S, D) of a sequence of length `seq`:

        x' = x + tanh(gate) * RMSNorm(branch) * branch_weight          (if `branch` is given; else x' = x)
        y  = RMSNorm(x') * weight * (1 + scale)                         (if `weight` is given)

    gate and scale are (B, D) rows (any row stride, unit last stride): the block's adaLN modulation; without them
    (a block without modulation, the caption refiner) the factor is 1. Returns
    (x' or None, y, y_scale): y as e4m3 with per-row float32 scales (rows, 1) when `quant`, else in x's dtype
    with y_scale None; y and y_scale are None without `weight`."""
    if not _use_triton(x):
        return residual_norm_reference(x, seq, eps, branch, branch_weight, gate, weight, scale, quant)
    rows, n = x.shape
    has_branch, has_norm = branch is not None, weight is not None
    has_gate, has_scale = has_branch and gate is not None, has_norm and scale is not None
    x_out = torch.empty_like(x) if has_branch else None
    y = torch.empty((rows, n), dtype=fp8.E4M3 if quant else x.dtype, device=x.device) if has_norm else None
    y_scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device) if has_norm and quant else None
    t, cfg = _triton(), CONFIG["residual_norm"]
    dummy = x
    t.residual_norm_kernel[(t.triton.cdiv(rows, cfg["rows"]),)](
        x, branch if has_branch else dummy, x_out if has_branch else dummy,
        branch_weight if has_branch else dummy, gate if has_gate else dummy, gate.stride(0) if has_gate else 0,
        weight if has_norm else dummy, scale if has_scale else dummy, scale.stride(0) if has_scale else 0,
        y if has_norm else dummy, y_scale if y_scale is not None else dummy,
        rows, seq, n, eps, fp8.E4M3_MAX, fp8._TINY,
        HAS_BRANCH=has_branch, HAS_GATE=has_gate, HAS_NORM=has_norm, HAS_SCALE=has_scale, QUANT=quant,
        ROWS=cfg["rows"], BLOCK=t.triton.next_power_of_2(n), num_warps=cfg["num_warps"])
    return x_out, y, y_scale


def _rms(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)


def residual_norm_reference(x, seq, eps, branch=None, branch_weight=None, gate=None, weight=None, scale=None,
                            quant=False):
    xf, x_out, y, y_scale = x.float(), None, None, None
    if branch is not None:
        g = 1.0 if gate is None else torch.tanh(gate.float()).repeat_interleave(seq, dim=0)
        x_out = (xf + g * _rms(branch.float(), eps) * branch_weight.float()).to(x.dtype)
        xf = x_out.float()
    if weight is not None:
        y = _rms(xf, eps) * weight.float()
        if scale is not None:
            y = y * (1.0 + scale.float()).repeat_interleave(seq, dim=0)
        y, y_scale = fp8.quantize_rows(y) if quant else (y.to(x.dtype), None)
    return x_out, y, y_scale


# ---- q/k RMSNorm + RoPE ------------------------------------------------------------------------------------
def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, freqs: torch.Tensor,
                 heads: int, eps: float) -> torch.Tensor:
    """qkv (rows, 3 * dim) (the fused q/k/v GEMM's output; q first, then k, v), freqs (rows, head_dim) float32 as
    (cos, sin) pairs (fastattn's real table). Returns (2, rows, dim): RoPE(RMSNorm_head(q) * q_weight), the same for
    k -- what diffusers' processor computes before attention, in float32, rounded once."""
    if not _use_triton(qkv):
        return qk_norm_rope_reference(qkv, q_weight, k_weight, freqs, heads, eps)
    rows, dim = qkv.shape[0], qkv.shape[1] // 3
    head = dim // heads
    out = torch.empty((2, rows, dim), dtype=qkv.dtype, device=qkv.device)
    t, cfg = _triton(), CONFIG["qk_norm_rope"]
    per = min(cfg["heads"], heads)
    grid = (t.triton.cdiv(rows, cfg["rows"]), 2, t.triton.cdiv(heads, per))
    t.qk_norm_rope_kernel[grid](qkv, qkv.stride(0), out, q_weight, k_weight, freqs, rows, dim, heads, eps,
                                freqs, freqs, freqs, fp8.E4M3_MAX, fp8._TINY, 1.0,  # (the e4m3 outputs': unused)
                                HEAD=head, ROWS=cfg["rows"], PER=per, QUANT=False, num_warps=cfg["num_warps"])
    return out


def qk_norm_rope_reference(qkv, q_weight, k_weight, freqs, heads, eps):
    return _qk_norm_rope_float(qkv, q_weight, k_weight, freqs, heads, eps).to(qkv.dtype)


def _qk_norm_rope_float(qkv, q_weight, k_weight, freqs, heads, eps):
    rows, dim = qkv.shape[0], qkv.shape[1] // 3
    cos, sin = freqs.float().unflatten(-1, (-1, 2)).unbind(-1)  # (rows, head/2)
    outs = []
    for part, weight in ((qkv[:, :dim], q_weight), (qkv[:, dim:2 * dim], k_weight)):
        v = _rms(part.float().unflatten(-1, (heads, -1)), eps) * weight.float()
        v0, v1 = v.unflatten(-1, (-1, 2)).unbind(-1)  # (rows, heads, head/2)
        c, s = cos[:, None], sin[:, None]
        outs.append(torch.stack((v0 * c - v1 * s, v0 * s + v1 * c), dim=-1).reshape(rows, dim))
    return torch.stack(outs)


def qk_bound_scales(q_weight: torch.Tensor, k_weight: torch.Tensor) -> torch.Tensor:
    """(2,) float32: the e4m3 scales of q and k after their per-head RMSNorm and RoPE, from the norms' weights alone.
    A head's RMSNorm output has |x_i| <= sqrt(head) (its mean square is 1), times the weight; RoPE rotates pairs, so
    each component stays within the pair's norm, <= sqrt(head) * max|w|. That bound maps to the e4m3 maximum, so no
    value can saturate and no reduction over the activations is needed; typical values land near 448 / sqrt(head)
    (~40 at 128), far above e4m3's smallest normal (2^-6). (The kernel takes max|w| from the weights it loads, so a
    step graph replayed after the weights change still scales by them.)"""
    amax = torch.stack([q_weight.detach().abs().amax(), k_weight.detach().abs().amax()]).float()
    return fp8.E4M3_MAX / (amax * q_weight.shape[-1] ** 0.5).clamp(min=fp8._TINY)


# O is written in v's scale times this: |O| <= amax|v| holds for exact softmax rows, but cuDNN rounds P to e4m3 after
# taking its row sum, so a row of O can exceed amax|v| by up to ~2^-4; the headroom keeps it from saturating.
O_HEADROOM = 15 / 16


def qkv_e4m3(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, freqs: torch.Tensor, heads: int,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operands of cuDNN's 8-bit attention from the fused q/k/v GEMM's output: q and k as qk_norm_rope computes
    them, times their bound scales (qk_bound_scales), and v times 448 / amax|v| (one reduction over v first), all as
    e4m3. Returns (out (3, rows, dim) e4m3: q, k, v in the (B, S, H, D) layout; scales (4,) float32: q's, k's and v's
    descales, then O's scale, 448 / amax|v| * O_HEADROOM; o_descale (rows, 1) float32: 1 / O's scale in every row, the
    to_out GEMM's row scales for O)."""
    rows, dim = qkv.shape[0], qkv.shape[1] // 3
    v_amax = torch.linalg.vector_norm(qkv[:, 2 * dim:], float("inf"), dtype=torch.float32).reshape(1)
    if not _use_triton(qkv):
        return qkv_e4m3_reference(qkv, q_weight, k_weight, freqs, heads, eps, v_amax)
    head = dim // heads
    out = torch.empty((3, rows, dim), dtype=fp8.E4M3, device=qkv.device)
    scales = torch.empty(4, dtype=torch.float32, device=qkv.device)
    o_descale = torch.empty((rows, 1), dtype=torch.float32, device=qkv.device)
    t, cfg = _triton(), CONFIG["qk_norm_rope"]
    per = min(cfg["heads"], heads)
    grid = (t.triton.cdiv(rows, cfg["rows"]), 3, t.triton.cdiv(heads, per))
    t.qk_norm_rope_kernel[grid](qkv, qkv.stride(0), out, q_weight, k_weight, freqs, rows, dim, heads, eps,
                                v_amax, scales, o_descale, fp8.E4M3_MAX, fp8._TINY, O_HEADROOM,
                                HEAD=head, ROWS=cfg["rows"], PER=per, QUANT=True, num_warps=cfg["num_warps"])
    return out, scales, o_descale


def qkv_e4m3_reference(qkv, q_weight, k_weight, freqs, heads, eps, v_amax):
    rows, dim = qkv.shape[0], qkv.shape[1] // 3
    qk_scale = qk_bound_scales(q_weight, k_weight)
    qk = _qk_norm_rope_float(qkv, q_weight, k_weight, freqs, heads, eps) * qk_scale[:, None, None]
    v_scale = fp8.E4M3_MAX / v_amax.float().clamp(min=fp8._TINY)
    v = qkv[:, 2 * dim:].float() * v_scale
    out = torch.cat([qk, v[None]]).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(fp8.E4M3)
    o_scale = v_scale * O_HEADROOM
    scales = torch.cat([1.0 / qk_scale, 1.0 / v_scale, o_scale])
    return out, scales, (1.0 / o_scale).expand(rows, 1).contiguous()


# ---- attention output -> fp8 ----------------------------------------------------------------------------------
def quantize_heads(o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, S, H, D) with unit last stride (attention's output, whatever its layout) -> (B*S, H*D) e4m3 and
    (B*S, 1) float32 row scales, as fp8.quantize_rows of o.reshape(B*S, H*D)."""
    if not _use_triton(o):
        return fp8.quantize_rows(o.reshape(o.shape[0] * o.shape[1], -1))
    b, s, h, d = o.shape
    q = torch.empty((b * s, h * d), dtype=fp8.E4M3, device=o.device)
    scale = torch.empty((b * s, 1), dtype=torch.float32, device=o.device)
    t = _triton()
    t.quantize_heads_kernel[(b * s,)](o, o.stride(0), o.stride(1), o.stride(2), q, scale, s, h, fp8.E4M3_MAX,
                                      fp8._TINY, HEAD=d, HEADS=t.triton.next_power_of_2(h), **CONFIG["quantize_heads"])
    return q, scale


# ---- SwiGLU (+ fp8) ---------------------------------------------------------------------------------------------
def swiglu(h: torch.Tensor, quant: bool = True, eager_rounding: bool = False):
    """h (rows, 2N) = [w1 x | w3 x] -> silu(h1) * h3: (e4m3 (rows, N), float32 (rows, 1)) when `quant`, else
    (h's dtype (rows, N), None). `eager_rounding`: round silu and the product to bf16 as the eager FFN does
    (swiglu_quant's contract), instead of keeping them in float32."""
    if not (_use_triton(h) and h.stride(-1) == 1):
        return swiglu_quant_reference(h) if eager_rounding else swiglu_reference(h, quant)
    rows, n = h.shape[0], h.shape[1] // 2
    y = torch.empty((rows, n), dtype=fp8.E4M3 if quant else h.dtype, device=h.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=h.device) if quant else None
    t = _triton()
    t.swiglu_kernel[(rows,)](h, y, scale if quant else h, h.stride(0), n, fp8.E4M3_MAX, fp8._TINY,
                             QUANT=quant, ROUND=eager_rounding, BLOCK=t.triton.next_power_of_2(n), **CONFIG["swiglu"])
    return y, scale


def swiglu_reference(h: torch.Tensor, quant: bool = True):
    h1, h3 = h.float().chunk(2, dim=-1)
    y = F.silu(h1) * h3
    return fp8.quantize_rows(y) if quant else (y.to(h.dtype), None)


def swiglu_quant_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h (..., 2N) = [w1 x | w3 x] -> fp8.quantize_rows(silu(h1) * h3) over rows of N, with the bf16 roundings of
    the eager FFN it replaces: e4m3 (rows, N), scales (rows, 1)."""
    h1, h3 = h.chunk(2, dim=-1)
    q, scale = fp8.quantize_rows((F.silu(h1) * h3).reshape(-1, h1.shape[-1]))
    return q.contiguous(), scale.contiguous()


def _fake(h):
    rows, n = h.numel() // h.shape[-1], h.shape[-1] // 2
    return (torch.empty((rows, n), dtype=fp8.E4M3, device=h.device),
            torch.empty((rows, 1), dtype=torch.float32, device=h.device))


@torch.library.custom_op("zimage::swiglu_quant", mutates_args=())
def swiglu_quant(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(h1) * h3 quantized per row to e4m3: (rows, N) e4m3 and (rows, 1) float32 scales. The Triton kernel for
    bf16 CUDA input with a unit last stride; the reference for anything else."""
    if not (h.is_cuda and h.dtype == torch.bfloat16 and h.stride(-1) == 1):
        return swiglu_quant_reference(h)
    return swiglu(h.reshape(-1, h.shape[-1]), quant=True, eager_rounding=True)


swiglu_quant.register_fake(_fake)


# ---- the Triton kernels ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _triton():
    """Triton is imported on first use only (CPU installs have none)."""
    import triton
    import triton.language as tl

    @triton.jit
    def residual_norm_kernel(x_ptr, branch_ptr, x_out_ptr, branch_w_ptr, gate_ptr, gate_stride, w_ptr, scale_ptr,
                             scale_stride, y_ptr, y_scale_ptr, rows, seq, n, eps, fp8_max, tiny,
                             HAS_BRANCH: tl.constexpr, HAS_GATE: tl.constexpr, HAS_NORM: tl.constexpr,
                             HAS_SCALE: tl.constexpr, QUANT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        b = (r // seq)[:, None]
        cols = tl.arange(0, BLOCK)
        mask = (r < rows)[:, None] & (cols < n)[None, :]
        offsets = r[:, None] * n + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_BRANCH:
            a = tl.load(branch_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            a = a * tl.rsqrt(tl.sum(a * a, axis=1) / n + eps)[:, None]
            a = a * tl.load(branch_w_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
            if HAS_GATE:
                g = tl.load(gate_ptr + b * gate_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                a = a * (1.0 - 2.0 / (tl.exp(2.0 * g) + 1.0))  # tanh(gate)
            x = (x + a).to(x_out_ptr.dtype.element_ty)
            tl.store(x_out_ptr + offsets, x, mask=mask)
            x = x.to(tl.float32)
        if HAS_NORM:
            y = x * tl.rsqrt(tl.sum(x * x, axis=1) / n + eps)[:, None]
            y = y * tl.load(w_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
            if HAS_SCALE:
                y = y * (1.0 + tl.load(scale_ptr + b * scale_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32))
            if QUANT:
                s = tl.maximum(tl.max(tl.abs(y), axis=1), tiny) / fp8_max
                q = tl.minimum(tl.maximum(y / s[:, None], -fp8_max), fp8_max)
                tl.store(y_ptr + offsets, q.to(y_ptr.dtype.element_ty), mask=mask)
                tl.store(y_scale_ptr + r, s, mask=r < rows)
            else:
                tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def qk_norm_rope_kernel(qkv_ptr, qkv_stride, out_ptr, q_w_ptr, k_w_ptr, freqs_ptr, rows, dim, heads, eps,
                            v_amax_ptr, scales_ptr, o_descale_ptr, fp8_max, tiny, o_headroom,
                            HEAD: tl.constexpr, ROWS: tl.constexpr, PER: tl.constexpr, QUANT: tl.constexpr):
        which = tl.program_id(1)  # 0: q, 1: k, 2: v (QUANT only: v scaled to e4m3)
        r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        rmask = (r < rows)[:, None]
        d = tl.arange(0, HEAD)
        src = qkv_ptr + r[:, None] * qkv_stride + which * dim + d[None, :]
        dst = out_ptr + which * rows * dim + r[:, None] * dim + d[None, :]
        first = tl.program_id(2) * PER
        corner = (tl.program_id(0) == 0) & (tl.program_id(2) == 0)  # writes the per-tensor scales
        if which == 2:
            v_scale = fp8_max / tl.maximum(tl.load(v_amax_ptr), tiny)
            if tl.program_id(2) == 0:  # O's descale in every row: the to_out GEMM's row scales
                tl.store(o_descale_ptr + r, tl.zeros((ROWS,), tl.float32) + 1.0 / (v_scale * o_headroom),
                         mask=r < rows)
            if corner:
                tl.store(scales_ptr + 2, 1.0 / v_scale)
                tl.store(scales_ptr + 3, v_scale * o_headroom)
            for i in range(PER):
                h = first + i
                if h < heads:
                    v = tl.load(src + h * HEAD, mask=rmask, other=0.0).to(tl.float32) * v_scale
                    v = tl.minimum(tl.maximum(v, -fp8_max), fp8_max)
                    tl.store(dst + h * HEAD, v.to(out_ptr.dtype.element_ty), mask=rmask)
        else:
            f = tl.load(freqs_ptr + r[:, None] * HEAD + d[None, :], mask=rmask, other=0.0)
            cos, sin = tl.split(tl.reshape(f, (ROWS, HEAD // 2, 2)))
            w = tl.load(q_w_ptr + d).to(tl.float32) * (1 - which) + tl.load(k_w_ptr + d).to(tl.float32) * which
            if QUANT:  # the bound scale (qk_bound_scales) from the weights just loaded, folded into them
                scale = fp8_max / tl.maximum(tl.max(tl.abs(w), axis=0) * tl.sqrt(HEAD * 1.0), tiny)
                w = w * scale
                if corner:
                    tl.store(scales_ptr + which, 1.0 / scale)
            for i in range(PER):
                h = first + i
                if h < heads:
                    v = tl.load(src + h * HEAD, mask=rmask, other=0.0).to(tl.float32)
                    v = v * tl.rsqrt(tl.sum(v * v, axis=1) / HEAD + eps)[:, None] * w[None, :]
                    v0, v1 = tl.split(tl.reshape(v, (ROWS, HEAD // 2, 2)))
                    o = tl.reshape(tl.join(v0 * cos - v1 * sin, v0 * sin + v1 * cos), (ROWS, HEAD))
                    if QUANT:
                        o = tl.minimum(tl.maximum(o, -fp8_max), fp8_max)
                    tl.store(dst + h * HEAD, o.to(out_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def quantize_heads_kernel(o_ptr, stride_b, stride_s, stride_h, q_ptr, scale_ptr, seq, heads, fp8_max, tiny,
                              HEAD: tl.constexpr, HEADS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b, s = row // seq, row % seq
        h = tl.arange(0, HEADS)
        d = tl.arange(0, HEAD)
        mask = (h < heads)[:, None]
        v = tl.load(o_ptr + b * stride_b + s * stride_s + h[:, None] * stride_h + d[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        sc = tl.maximum(tl.max(tl.max(tl.abs(v), axis=1), axis=0), tiny) / fp8_max
        q = tl.minimum(tl.maximum(v / sc, -fp8_max), fp8_max)
        tl.store(q_ptr + row * heads * HEAD + h[:, None] * HEAD + d[None, :], q.to(q_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(scale_ptr + row, sc)

    @triton.jit
    def swiglu_kernel(h_ptr, y_ptr, scale_ptr, stride_h, n, fp8_max, tiny, QUANT: tl.constexpr,
                      ROUND: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        a = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(h_ptr + row * stride_h + n + cols, mask=mask, other=0.0).to(tl.float32)
        silu = a / (1.0 + tl.exp(-a))
        if ROUND:  # the eager FFN's bf16 roundings (swiglu_quant reproduces them code for code)
            silu = silu.to(tl.bfloat16).to(tl.float32)
        y = silu * g
        if ROUND:
            y = y.to(tl.bfloat16).to(tl.float32)
        if QUANT:
            s = tl.maximum(tl.max(tl.abs(y), axis=0), tiny) / fp8_max
            q = tl.minimum(tl.maximum(y / s, -fp8_max), fp8_max)
            tl.store(y_ptr + row * n + cols, q.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(scale_ptr + row, s)
        else:
            tl.store(y_ptr + row * n + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    return types.SimpleNamespace(triton=triton, residual_norm_kernel=residual_norm_kernel,
                                 qk_norm_rope_kernel=qk_norm_rope_kernel, quantize_heads_kernel=quantize_heads_kernel,
                                 swiglu_kernel=swiglu_kernel)
