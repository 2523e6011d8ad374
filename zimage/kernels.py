"""A hand-written Triton kernel for the SwiGLU of every fp8 FFN, fused with the quantization of its output.

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

import torch
import torch.nn.functional as F

from . import fp8


def swiglu_quant_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h (..., 2N) = [w1 x | w3 x] -> fp8.quantize_rows(silu(h1) * h3) over rows of N: e4m3 (rows, N), scales (rows, 1)."""
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
    triton, kernel = _triton_kernel()
    n = h.shape[-1] // 2
    rows = h.numel() // h.shape[-1]
    h2 = h.reshape(rows, 2 * n)
    q = torch.empty((rows, n), dtype=fp8.E4M3, device=h.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=h.device)
    block = triton.next_power_of_2(n)
    kernel[(rows,)](h2, q, scale, h2.stride(0), n, fp8.E4M3_MAX, fp8._TINY, BLOCK=block,
                    num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)
    return q, scale


swiglu_quant.register_fake(_fake)


@functools.lru_cache(maxsize=1)
def _triton_kernel():
    """Triton is imported on first CUDA use only (CPU installs have none)."""
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_quant_kernel(h_ptr, q_ptr, scale_ptr, stride_h, n, fp8_max, tiny, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        a = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(h_ptr + row * stride_h + n + cols, mask=mask, other=0.0).to(tl.float32)
        silu = (a / (1.0 + tl.exp(-a))).to(tl.bfloat16).to(tl.float32)  # F.silu in bf16 rounds its output
        y = (silu * g).to(tl.bfloat16).to(tl.float32)  # so does the product
        scale = tl.maximum(tl.max(tl.abs(y), axis=0), tiny) / fp8_max
        q = tl.minimum(tl.maximum(y / scale, -fp8_max), fp8_max)
        tl.store(q_ptr + row * n + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, scale)

    return triton, swiglu_quant_kernel
