"""The main transformer blocks scheduled by hand: the GEMMs, attention and the Triton kernels of kernels.py, in
Python, without Inductor (speed switch `block_kernels`).

Why: the compiled fp8 step (H100, 2026-11-25) spent 39.5 ms/step in GEMMs at the fp8 floor and 15 ms in attention,
but ~14 ms in Inductor's norm/RoPE/quantization kernels where their bytes need ~6 ms: its looped reductions read
each 3840- or 10240-wide row two or three times (the RMS, the amax, then the quantized write). The block's
non-GEMM work is four row operations; written as kernels that read each row once, and with the last residual of
one block fused into the first norm of the next, a block is eleven launches (ten in bf16):

    adaLN modulation (the block's Linear, through its module)         (scale_msa | gate_msa | scale_mlp | gate_mlp)
    (first block only) RMSNorm(x) * (1 + scale_msa) -> e4m3          kernels.residual_norm
    q/k/v GEMM (fused weight)                                         fp8.scaled_mm / F.linear
    per-head RMSNorm + RoPE of q and k                                kernels.qk_norm_rope
    attention (FlashAttention-4 where installed, else SDPA; 8-bit with switch fp8_attention)   fp8_attention.py
    attention output -> e4m3; to_out GEMM                             kernels.quantize_heads

With switch `cudnn_fp8_attention` (fp8 weights, cudnn_attention.py) the three middle rows change: the q/k norm + RoPE
kernel writes q, k and v as e4m3 (kernels.qkv_e4m3), cuDNN's 8-bit attention writes O as e4m3 in a scale taken from
v's, and the to_out GEMM reads it with that scale's inverse as its row scales (no quantize_heads).
    x += tanh(gate_msa) * RMSNorm(attn); RMSNorm(x) * (1 + scale_mlp) -> e4m3     kernels.residual_norm
    w1/w3 GEMM (fused weight); silu(h1) * h3 -> e4m3; w2 GEMM        kernels.swiglu
    x += tanh(gate_mlp) * RMSNorm(ffn); the next block's first norm -> e4m3      kernels.residual_norm

The same schedule runs bf16 weights (the kernels then write bf16). With switch `fused_gemms` (fused_gemm.py, a
Hopper GPU), the q/k norm + RoPE runs in the q/k/v GEMM's epilogue, and in bf16 the SwiGLU in the w1/w3 GEMM's.
Nothing here is traced by Dynamo, so a restart does not trace the 30 main blocks; `cudagraph.GraphedBlocks` calls
`Schedule.run` for the stack, and the whole step is captured as one CUDA graph by `cudagraph.GraphedTransformer`
(switch `step_graphs`). Measured (H100, Standard, fp8, docs/PERFORMANCE.md 2026-11-25 second session): 74.7 ->
70.7 ms/step in one engine. Numerics: the blocks' math in float32 between bf16 (or e4m3) tensors, like the compiled
code (tests/test_fastblocks.py compares it with diffusers' blocks on the CPU, through the kernels' PyTorch
references).

The refiners run on it too (`speed.apply_switches`): the image refiner's blocks are modulated like the main ones,
the caption refiner's have no adaLN (no scale, no gate). `run` returns None where the schedule does not apply, and
the caller runs diffusers' blocks instead: an attention mask or per-token modulation, a block without fused projections (fusion.py) or with an active LoRA branch
(lora.py, branch mode; merged LoRAs are in the weights and need nothing), weights other than bf16/e4m3.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import cudnn_attention, fp8, fused_gemm, kernels, lt_gemm
from . import fp8_attention as attention8
from .fusion import base_linear

log = logging.getLogger("zimage.fastblocks")


class _Block:
    """What one block's schedule reads, gathered once: weights (shared with the module, so merged LoRAs and
    in-place updates are seen), norms' eps, the attention call."""

    def __init__(self, block):
        attention, ffn = block.attention, block.feed_forward
        self.block = block
        self.modulated = bool(block.modulation)  # the caption refiner's blocks have no adaLN
        self.qkv = attention.fused_qkv
        self.out = base_linear(attention.to_out[0])
        self.w13 = ffn.fused_w13
        self.w2 = base_linear(ffn.w2)
        self.fp8 = self.qkv.fp8
        self.heads = attention.heads
        self.eps = block.attention_norm1.eps
        self.qk_eps = attention.norm_q.eps
        self.norms = (block.attention_norm1.weight, block.attention_norm2.weight, block.ffn_norm1.weight,
                      block.ffn_norm2.weight, attention.norm_q.weight, attention.norm_k.weight)
        self.loras = [m for m in (attention.to_q, attention.to_k, attention.to_v, attention.to_out[0], ffn.w1, ffn.w2,
                                  ffn.w3) if hasattr(m, "active")]
        processor = attention.processor
        self.fa4 = getattr(processor, "use_fa4", False)
        self.backend = getattr(processor, "_attention_backend", None)
        self.parallel = getattr(processor, "_parallel_config", None)

    def ready(self) -> bool:
        return not any(m.active for m in self.loras)

    def gemm(self, linear, rows, rows_scale, lt=None):
        """rows (e4m3 with per-row scales, or bf16) times the Linear's (fused) weight; `lt`: an lt_gemm.LtGemms."""
        if lt is not None:
            out = lt.linear(rows, linear.weight, rows_scale, linear.weight_scale if self.fp8 else None)
            if out is not None:
                return out
        if self.fp8:
            return fp8.scaled_mm(rows, rows_scale, linear.weight, linear.weight_scale, None, torch.bfloat16)
        return F.linear(rows, linear.weight)

    def attend(self, q, k, v):
        """(B, S, H, D) in and out."""
        if self.fa4:
            from flash_attn.cute import flash_attn_func

            out = flash_attn_func(q, k, v, softmax_scale=q.shape[-1] ** -0.5, causal=False)
            return out[0] if isinstance(out, tuple) else out
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self.backend,
                                     parallel_config=self.parallel)


def _describe(block) -> "_Block | None":
    """The block's schedule, or None when it cannot run one (not fused, odd weights)."""
    attention, ffn = getattr(block, "attention", None), getattr(block, "feed_forward", None)
    qkv, w13 = getattr(attention, "fused_qkv", None), getattr(ffn, "fused_w13", None)
    if qkv is None or w13 is None or not hasattr(block, "modulation"):
        return None
    if attention.norm_q is None or attention.norm_k is None or len(attention.to_out) < 1:
        return None
    out, w2 = base_linear(attention.to_out[0]), base_linear(ffn.w2)
    fp8_weights = qkv.fp8
    kinds = {isinstance(m, fp8.Fp8Linear) for m in (out, w2)} | {w13.fp8}
    if kinds != {fp8_weights} or out.bias is not None or w2.bias is not None:
        return None
    if not fp8_weights and qkv.weight.dtype != torch.bfloat16:
        return None
    return _Block(block)


class Schedule:
    """The schedules of a block stack (`transformer.layers`), built on first use."""

    def __init__(self, allow_cpu: bool = False, fp8_attention: bool = False, fused_gemms: bool = False,
                 lt_gemms: bool = False, cudnn_fp8_attention: bool = False):
        self.blocks: list[_Block] | None = None
        self.cudnn_fp8_attention = cudnn_fp8_attention  # fp8 blocks: cuDNN's 8-bit attention (cudnn_attention.py)
        self.lt_gemms = lt_gemms  # the GEMMs on cuBLASLt with timed algorithms (lt_gemm.py) where it is installed
        self.fp8_attention = fp8_attention  # attention on 8-bit operands (fp8_attention.py) where its shapes fit
        self.fused_gemms = fused_gemms  # GEMMs with the next row kernel in their epilogue (fused_gemm.py)
        self.layers: tuple = ()  # the modules `blocks` was planned for (a plan that failed is kept too)
        self.runs = 0
        self.allow_cpu = allow_cpu  # the tests: CPU tensors run the kernels' PyTorch references

    def plan(self, layers) -> "list[_Block] | None":
        if len(layers) != len(self.layers) or any(a is not b for a, b in zip(layers, self.layers, strict=True)):
            self.layers = tuple(layers)
            described = [_describe(b) for b in layers]
            # One eps for every norm: the fused residual kernel applies it to this block's and the next one's norm.
            same = len({(d.eps, d.qk_eps, d.modulated) for d in described if d is not None}) == 1
            self.blocks = described if described and None not in described and same else None
            if self.blocks is None:
                log.info("block kernels: the blocks are not all fused bf16/fp8 blocks; diffusers' blocks run")
        return self.blocks

    def run(self, layers, x: torch.Tensor, freqs: torch.Tensor, adaln: torch.Tensor | None) -> "torch.Tensor | None":
        """The stack's output for x (B, S, D), freqs (B, S, head_dim/2, 2) real, adaln (B, C) (None for blocks without
        modulation); None when the schedule does not apply (see the module docstring)."""
        if x.dtype != torch.bfloat16 or x.dim() != 3 or freqs.is_complex():
            return None
        if not (x.is_cuda and kernels.available(x.device)) and not self.allow_cpu:
            return None
        blocks = self.plan(layers)
        if blocks is None or not all(b.ready() for b in blocks) or (adaln is None) == blocks[0].modulated:
            return None
        self.runs += 1
        head = x.shape[-1] // blocks[0].heads  # the q/k epilogue's tile is one head: a power of two
        fused = (self.fused_gemms and head in (16, 32, 64, 128, 256)
                 and (fused_gemm.available(x.device) if x.is_cuda else kernels._interpreting()))
        lt = lt_gemm.gemms() if self.lt_gemms and x.is_cuda and lt_gemm.available(x.device) else None
        cudnn8 = (self.cudnn_fp8_attention and blocks[0].fp8
                  and cudnn_attention.supported(x.device, x.shape[0], x.shape[1], blocks[0].heads, head))
        return run_blocks(blocks, x, freqs, adaln, self.fp8_attention, fused, lt, cudnn8)


def run_blocks(blocks: list[_Block], x: torch.Tensor, freqs: torch.Tensor, adaln: torch.Tensor | None,
               fp8_attention: bool = False, fused_gemms: bool = False, lt=None,
               cudnn_fp8_attention: bool = False) -> torch.Tensor:
    batch, seq, dim = x.shape
    rows = batch * seq
    quant = blocks[0].fp8
    freqs = freqs.reshape(rows, -1).float().contiguous()
    x = x.reshape(rows, dim).contiguous()
    # adaLN modulation of every block (through the module: a LoRA on it applies): (B, 4 dim) =
    # scale_msa | gate_msa | scale_mlp | gate_mlp, each used inside the kernels (1 + scale, tanh(gate)).
    # Blocks without modulation: no scale, no gate (the kernels' factor is 1).
    mods = [b.block.adaLN_modulation(adaln) if b.modulated else None for b in blocks]

    def part(mod, k):  # k-th of the four (B, dim) modulation vectors
        return None if mod is None else mod[:, k * dim:(k + 1) * dim]

    qkv_epilogue = fused_gemms and fused_gemm.enabled("qkv_gemm_fp8" if quant else "qkv_gemm")
    swiglu_epilogue = fused_gemms and not quant and fused_gemm.enabled("swiglu_gemm")
    first = blocks[0]
    _, h, h_scale = kernels.residual_norm(x, seq, first.eps, weight=first.norms[0], scale=part(mods[0], 0),
                                          quant=quant)
    for i, b in enumerate(blocks):
        mod = mods[i]
        norm1, norm2, ffn_norm1, ffn_norm2, q_weight, k_weight = b.norms
        shape = (batch, seq, b.heads, dim // b.heads)
        if cudnn_fp8_attention:
            attn = _attention_e4m3(b, h, h_scale, freqs, shape, lt)
        else:
            if qkv_epilogue:
                q, k, v = (t.view(shape) for t in fused_gemm.qkv_norm_rope(
                    h, h_scale, b.qkv.weight, b.qkv.weight_scale if quant else None, q_weight, k_weight, freqs,
                    b.heads, b.qk_eps))
            else:
                qkv = b.gemm(b.qkv, h, h_scale, lt)
                qk = kernels.qk_norm_rope(qkv, q_weight, k_weight, freqs, b.heads, b.qk_eps)
                q, k, v = qk[0].view(shape), qk[1].view(shape), qkv[:, 2 * dim:].view(shape)
            o = attention8.attention(q, k, v) if fp8_attention and attention8.supported(q) else b.attend(q, k, v)
            if quant:
                o, o_scale = kernels.quantize_heads(o)
            else:
                o, o_scale = o.reshape(rows, dim), None
            attn = b.gemm(b.out, o, o_scale, lt)
        x, h, h_scale = kernels.residual_norm(x, seq, b.eps, branch=attn, branch_weight=norm2, gate=part(mod, 1),
                                              weight=ffn_norm1, scale=part(mod, 2), quant=quant)
        if swiglu_epilogue:
            g, g_scale = fused_gemm.swiglu(h, b.w13.weight), None
        else:
            g, g_scale = kernels.swiglu(b.gemm(b.w13, h, h_scale, lt), quant=quant)
        ffn = b.gemm(b.w2, g, g_scale, lt)
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        x, h, h_scale = kernels.residual_norm(
            x, seq, b.eps, branch=ffn, branch_weight=ffn_norm2, gate=part(mod, 3),
            weight=nxt.norms[0] if nxt else None, scale=part(mods[i + 1], 0) if nxt else None, quant=quant)
    return x.view(batch, seq, dim)


def _attention_e4m3(b: _Block, h, h_scale, freqs, shape, lt) -> torch.Tensor:
    """The attention half of an fp8 block on cuDNN's 8-bit attention: e4m3 q/k/v in, e4m3 O out, read by to_out with
    O's descale as its row scales. Returns to_out's output (rows, dim) bf16."""
    qkv8, scales, o_descale = kernels.qkv_e4m3(b.gemm(b.qkv, h, h_scale, lt), b.norms[4], b.norms[5], freqs, b.heads,
                                               b.qk_eps)
    q, k, v = (t.view(shape) for t in qkv8)
    o = cudnn_attention.attention_e4m3(q, k, v, *scales.split(1))
    return b.gemm(b.out, o.view(h.shape[0], -1), o_descale, lt)
