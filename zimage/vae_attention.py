"""The VAE decoder's mid-block attention as two GEMMs and a softmax.

Why: the FLUX VAE decoder's mid-block has one diffusers `Attention` with one head of 512 channels over every latent
pixel (16 384 tokens at 1024^2). Flash and cuDNN SDPA take head sizes <= 256, so PyTorch runs it on its sm80
memory-efficient kernel: 4.6 ms of a 35 ms decode on the H100. As plain GEMMs -- q k^T into float32, softmax in
float32, P (cast to v's dtype) times v -- it is 550 GFLOP of tensor-core work plus a few passes over the scores,
predicted ~1.5-2 ms.

`zimage::gemm_attention` is a custom op, opaque to Inductor: traced through, Inductor's pattern matcher would
rewrite matmul-softmax-matmul back into SDPA. It walks the queries in chunks whose float32 scores take at most
CHUNK_BYTES (256 MiB: 4096 queries at S = 16384), writing into one preallocated output; no host syncs, so it runs
inside the compiled decoder's CUDA graphs. `GemmAttnProcessor` is diffusers' AttnProcessor2_0 with this op in place
of SDPA (SDPA still where there is an attention mask); `install` sets it on the decoder's attentions whose head dim
exceeds what flash/cuDNN take, `uninstall` restores AttnProcessor2_0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = 256 << 20  # float32 scores of one chunk of queries, at most (read at call time)
_out_dtype_gemm = True  # bf16/fp16 q k^T straight into float32 (aten baddbmm.dtype, CUDA); off if this torch refuses


def chunk_rows(batch: int, keys: int, budget: int | None = None) -> int:
    """Queries per chunk: float32 scores (batch, rows, keys) within `budget` bytes; a multiple of 128 where >= 128."""
    rows = max(1, (CHUNK_BYTES if budget is None else budget) // (4 * batch * max(keys, 1)))
    return rows - rows % 128 if rows >= 128 else rows


def _scores(q: torch.Tensor, kt: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """out = scale * q @ kt in float32 (out (N, rows, keys) float32)."""
    global _out_dtype_gemm
    if _out_dtype_gemm and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.baddbmm(out, q, kt, torch.float32, beta=0.0, alpha=scale, out=out)
        except (RuntimeError, TypeError):  # an argument check, raised before any kernel is queued
            _out_dtype_gemm = False
    return torch.baddbmm(out, q.float(), kt.float(), beta=0.0, alpha=scale, out=out)


@torch.library.custom_op("zimage::gemm_attention", mutates_args=())
def gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """softmax(q k^T D^-1/2) v for q, k, v (B, H, S, D), in v's dtype; scores and softmax in float32.
    `chunk`: queries per chunk (0: from CHUNK_BYTES)."""
    b, h, s_q, d = q.shape
    s_k, d_v = k.shape[-2], v.shape[-1]
    n = b * h
    q3, kt, v3 = q.reshape(n, s_q, d), k.reshape(n, s_k, d).transpose(1, 2), v.reshape(n, s_k, d_v)
    out = torch.empty(n, s_q, d_v, dtype=v.dtype, device=v.device)
    rows = min(chunk if chunk > 0 else chunk_rows(n, s_k), s_q)
    scores = torch.empty(n, rows, s_k, dtype=torch.float32, device=q.device)
    scale = d ** -0.5
    for start in range(0, s_q, rows):
        stop = min(start + rows, s_q)
        part = _scores(q3[:, start:stop], kt, scale, scores[:, :stop - start])
        probs = torch.softmax(part, dim=-1).to(v.dtype)
        torch.bmm(probs, v3, out=out[:, start:stop])
    return out.view(b, h, s_q, d_v)


@gemm_attention.register_fake
def _(q, k, v, chunk=0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


class GemmAttnProcessor:
    """diffusers' AttnProcessor2_0 with `zimage::gemm_attention` in place of SDPA (SDPA where a mask is given)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None:
            hidden_states = torch.ops.zimage.gemm_attention(query, key, value)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                           is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attentions(vae):
    from diffusers.models.attention_processor import Attention

    return [m for m in vae.decoder.modules() if isinstance(m, Attention)]


def install(vae, min_head_dim: int = 257) -> int:
    """GemmAttnProcessor on every Attention of `vae.decoder` whose head dim is >= `min_head_dim` (default: > 256,
    the heads SDPA cannot send to flash or cuDNN); returns how many."""
    count = 0
    for attn in _attentions(vae):
        if attn.inner_dim // attn.heads >= min_head_dim:
            attn.set_processor(GemmAttnProcessor())
            count += 1
    return count


def uninstall(vae) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    for attn in _attentions(vae):
        if isinstance(attn.processor, GemmAttnProcessor):
            attn.set_processor(AttnProcessor2_0())
