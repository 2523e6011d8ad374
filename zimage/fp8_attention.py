"""Attention on 8-bit operands on the tensor cores: a FlashAttention-style forward in Triton (speed switch
`fp8_attention`, inside the block schedule of fastblocks.py).

Why: with the GEMMs at the fp8 floor, attention is a quarter of the fp8 denoise step (H200, 2026-12-02: 16.3 of
~64 ms busy a step, cuDNN's bf16 kernel at ~670 TFLOP/s). The tensor cores run int8 and e4m3 at twice the bf16 rate,
so both of attention's matrix products in 8 bits are the largest lever left, and the only one of that size for
bf16 weights. Measured (H100, 2026-12-07, docs/PERFORMANCE.md): this kernel runs at 0.70-0.95x cuDNN's bf16 rate
before its quantization passes, so the engine got slower (fp8 +31 ms, bf16 +17 ms a Standard generation); the switch
stays off until a faster kernel (FlashAttention-3's warp-specialised schedule) replaces this one.

Numerics (SageAttention's split -- int8 for QK^T, e4m3 for PV -- with per-tile scales):
    q, k       each (token tile of TILE = 128, head) block quantized with one float32 scale: int8 (QK_FORMAT, its
               largest magnitude maps to 127; for Gaussian-like values ~3x less rounding error on the logits than
               e4m3's 3-bit mantissa) or e4m3. q and k come out of a per-head RMSNorm, so tiles are alike in scale.
               k first loses its mean over the tokens (SMOOTH_K; softmax cannot see it).
    v          the same tiles in e4m3 (largest magnitude -> 448). e4m3 is a floating-point format -- 15 binades of
               normal range -- so a coarse scale costs little beyond the 3-bit mantissa.
    S = QK^T   int8 x int8 -> int32 (or e4m3 -> float32) on the tensor cores, times (softmax scale x q tile scale x
               k tile scale).
    softmax    online (running max and sum in float32, as FlashAttention).
    O = PV     P in [0, 1] is stored as e4m3 after scaling it by c_j = 448 sv_j / max(sv) for key tile j (so the
               largest tile uses the whole e4m3 range, and P times V's per-tile scale is exact up to P's rounding:
               the accumulator stays in one unit, max(sv) / 448, so each key block's product adds to it directly).
               The scaling folds into the exponent: exp2(s - m + log2 c_j). The row sum uses the unrounded P. The
               products are added in float32, not in the tensor cores' e4m3 accumulator (~14 mantissa bits: in
               place over ~70 blocks it shrank the output by 0.3 % at 4352 tokens).
    out        acc * max(sv) / 448 / rowsum, bf16, in the (B, S, H, D) layout the to_out projection reads.

V is stored transposed per head, (B, H, D, S): for the second product the e4m3 tensor-core instruction on Hopper
needs its B operand K-major, i.e. tokens contiguous (as Triton's fused-attention tutorial does for fp8). The kernels
are in fp8_attention_triton.py; one compiled attention kernel serves every sequence length (whole key blocks
unmasked, then the partial one), so a caption length the warm-up never saw compiles nothing mid-request.

`attention_reference` is the same arithmetic in PyTorch (what a CPU runs; its softmax uses the final row maximum
where the kernel's is running, so P rounds slightly differently). tests/test_fp8_attention.py checks the kernels in
Triton's interpreter against it and both against exact attention; the end-to-end quality bound on the GPU is in
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import math

import torch

from . import fp8
from .kernels import _use_triton

TILE = 128  # tokens per quantization scale; the kernel's blocks divide it
# The format of q and k for the first product: "int8" (SageAttention's choice: ~3x less rounding error than e4m3
# on the logits for the same tensor-core rate on Hopper) or "e4m3". V and P are e4m3 either way.
QK_FORMAT = "int8"
INT8_MAX = 127.0
# Subtract k's mean over the tokens (per head and channel) before quantizing it: softmax is unchanged (q . mean is
# the same for every key of a query), and a bias that all keys share -- SageAttention found such channel outliers
# in k across real models, diffusion transformers among them -- no longer takes the int8 range from what differs.
# Random weights have no such bias, so bench figures on `random-full` cannot show its benefit; it costs a mean.
SMOOTH_K = True
# Launch parameters (bench/attention.py --sweep times the alternatives on the GPU). Not yet tuned on a device.
CONFIG = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3}
QUANTIZE_CONFIG = {"num_warps": 8}


def supported(q: torch.Tensor) -> bool:
    """The kernel's shapes: (B, S, H, D) bf16 with D a power of two in [32, 256] (8-bit products need K >= 32)."""
    d = q.shape[-1]
    return q.dim() == 4 and q.dtype == torch.bfloat16 and 32 <= d <= 256 and d & (d - 1) == 0


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal attention of (B, S, H, D) bf16 tensors (any strides with a unit last one) on 8-bit operands;
    returns (B, S, H, D) bf16, contiguous."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q8, sq, k8, sk, v8, sv = quantize_inputs(q, k, v)
    if not _use_triton(q8):
        return attention_reference(q8, sq, k8, sk, v8, sv, scale)
    b, s, h, d = q.shape
    out = torch.empty((b, s, h, d), dtype=torch.bfloat16, device=q.device)
    cfg, t = CONFIG, _triton()
    grid = (t.triton.cdiv(s, cfg["block_m"]), b * h)
    t.attention_kernel[grid](q8, k8, v8, sq, sk, sv, sv.amax(dim=-1).contiguous(), out, out.stride(0), out.stride(1),
                             out.stride(2), s, h, sq.shape[-1], scale * math.log2(math.e), fp8.E4M3_MAX, D=d, TILE=TILE,
                             BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], num_warps=cfg["num_warps"],
                             num_stages=cfg["num_stages"])
    return out


# ---- quantization: per (token tile, head) ------------------------------------------------------------------
def quantize_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The attention kernel's operands, (q8, sq, k8, sk, v8t, sv): q and k in QK_FORMAT (k smoothed when SMOOTH_K),
    v in e4m3 transposed; what `attention` runs on and `attention_reference` takes."""
    q8, sq = quantize_tiles(q, fmt=QK_FORMAT)
    k8, sk = quantize_tiles(k, fmt=QK_FORMAT, subtract=k.mean(dim=1, dtype=torch.float32) if SMOOTH_K else None)
    v8, sv = quantize_tiles(v, transpose=True)
    return q8, sq, k8, sk, v8, sv


def quantize_tiles(x: torch.Tensor, transpose: bool = False, fmt: str = "e4m3",
                   subtract: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, S, H, D), unit last stride -> e4m3 or int8 (`fmt`) (B, H, S, D), or (B, H, D, S) when `transpose`,
    and float32 scales (B, H, ceil(S / TILE)) with x - subtract ~= q * scale of its tile (`subtract`: (B, H, D)
    float32, one vector per head taken from every token, or None)."""
    if not _use_triton(x):
        return quantize_tiles_reference(x, transpose, fmt, subtract)
    b, s, h, d = x.shape
    tiles = -(-s // TILE)
    int8 = fmt == "int8"
    q = torch.empty((b, h, d, s) if transpose else (b, h, s, d), dtype=torch.int8 if int8 else fp8.E4M3,
                    device=x.device)
    scale = torch.empty((b, h, tiles), dtype=torch.float32, device=x.device)
    sub = scale if subtract is None else subtract.contiguous()
    _triton().quantize_kernel[(tiles, b * h)](x, x.stride(0), x.stride(1), x.stride(2), sub, q, scale, s, h, tiles,
                                              INT8_MAX if int8 else fp8.E4M3_MAX, fp8._TINY, D=d, TILE=TILE,
                                              TRANSPOSE=transpose, INT8=int8, SUBTRACT=subtract is not None,
                                              **QUANTIZE_CONFIG)
    return q, scale


def quantize_tiles_reference(x: torch.Tensor, transpose: bool = False, fmt: str = "e4m3",
                             subtract: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, h, d = x.shape
    tiles = -(-s // TILE)
    top = INT8_MAX if fmt == "int8" else fp8.E4M3_MAX
    xf = x.float().permute(0, 2, 1, 3)  # (B, H, S, D)
    if subtract is not None:
        xf = xf - subtract[:, :, None, :]
    xf = torch.nn.functional.pad(xf, (0, 0, 0, tiles * TILE - s))  # (B, H, S', D): padded tokens are 0
    blocks = xf.unflatten(2, (tiles, TILE))
    scale = blocks.abs().amax(dim=(-2, -1)).clamp(min=fp8._TINY) / top  # (B, H, tiles)
    q = (blocks / scale[..., None, None]).clamp(-top, top)
    # int8: round half away from zero, as the kernel (add 0.5 toward the sign, then truncate)
    q = torch.trunc(q + 0.5 * torch.sign(q)).to(torch.int8) if fmt == "int8" else q.to(fp8.E4M3)
    q = q.flatten(2, 3)[:, :, :s]
    return (q.transpose(-1, -2) if transpose else q).contiguous(), scale


def _per_token(scale: torch.Tensor, s: int) -> torch.Tensor:
    """(B, H, tiles) -> (B, H, S): each token's tile scale."""
    return scale.repeat_interleave(TILE, dim=-1)[..., :s]


def attention_reference(q8, sq, k8, sk, v8t, sv, scale: float) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch (float32): e4m3 inputs as quantize_tiles returns them; (B, S, H, D) bf16."""
    s = q8.shape[2]
    logits = (q8.float() @ k8.float().transpose(-1, -2)) * (scale * _per_token(sq, s)[..., :, None]
                                                             * _per_token(sk, s)[..., None, :])
    p = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    rowsum = p.sum(dim=-1, keepdim=True)
    sv_max = sv.amax(dim=-1, keepdim=True)  # (B, H, 1)
    c = _per_token(fp8.E4M3_MAX * sv / sv_max, s)  # P's per-key-tile factor
    p8 = (p * c[..., None, :]).to(fp8.E4M3).float()
    out = (p8 @ v8t.float().transpose(-1, -2)) * (sv_max[..., None] / fp8.E4M3_MAX) / rowsum
    return out.transpose(1, 2).to(torch.bfloat16).contiguous()


def _triton():
    """The kernels' module (it imports Triton), on first use only: CPU installs have no Triton."""
    from . import fp8_attention_triton

    return fp8_attention_triton
