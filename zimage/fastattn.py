"""A project-side attention processor for ZImageTransformer2DModel: real-valued RoPE, and FlashAttention-4.

Why: diffusers' `ZSingleStreamAttnProcessor` applies RoPE as a complex multiplication
(`view_as_complex(q.float()) * freqs_cis`). Inductor cannot generate code for complex tensors, so under
torch.compile that multiply runs as an eager kernel between two compiled pieces: on the H100 it cost 26 ms
per Standard generation (544 launches), and the float->bf16 cast after it became a separate 17 ms of triton
copies in front of cuDNN attention. The same rotation written with real tensors,

    (x0 + i x1) (cos + i sin) = (x0 cos - x1 sin) + i (x0 sin + x1 cos),

is ordinary pointwise math that Inductor fuses with the q/k RMSNorm and the cast: one kernel per q and k that
reads the projection once and writes bf16 (B, S, H, D) ready for attention.

What changes in the model (`install`): every attention module gets `RealRopeAttnProcessor`, and the
transformer's `rope_embedder` returns the rotation table as real (..., D/2, 2) = (cos, sin) pairs instead
of complex64, so the freqs flowing through `_prepare_sequence`/`_build_unified_sequence` are float32 (the
padding those functions do is the same for both forms). Weights and state-dict keys are untouched; LoRA
loading still works. `uninstall` restores diffusers' processor and table.

The arithmetic is the same as diffusers' in float32 (RoPE in float32, then cast to the query dtype), so
outputs match to float32 rounding: tests/test_fastattn.py compares against diffusers' own processor on a
small random ZImageTransformer2DModel.

FlashAttention-4 (`flash-attn-4`, `flash_attn.cute`): optional, CUDA (Hopper/Blackwell) only, never needed
on CPU or in CI. Its `flash_attn_func` takes (B, S, H, D) directly -- the layout the projections produce --
so no transposes or copies at all. It is not a registered PyTorch op; `zimage::fa4_attention` wraps it with
`torch.library.custom_op` + `register_fake` so torch.compile traces through it (fullgraph) instead of
breaking the graph. Used for unmasked attention (one prompt, or equal-length prompts); a masked call falls
back to the configured SDPA backend.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("zimage.fastattn")

FA4 = "fa4"  # our attention-setting name for FlashAttention-4 (not a diffusers backend name)


# ---- FlashAttention-4 as a custom op ------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def fa4_importable() -> bool:
    """True when flash-attn-4's CuTe interface is importable. Looks for the function, not the namespace:
    flash-attn-4 installs `flash_attn.cute` only, FlashAttention-2 installs `flash_attn.flash_attn_interface`."""
    try:
        if importlib.util.find_spec("flash_attn.cute") is None:
            return False
        from flash_attn.cute import flash_attn_func  # noqa: F401
    except Exception as exc:  # a broken install (missing cutlass DSL, CUDA libs) counts as absent
        log.debug("flash-attn-4 not usable: %r", exc)
        return False
    return True


def fa4_supported(device: str) -> bool:
    """FA4 has forward kernels for sm90 (Hopper) and sm100 (Blackwell)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(torch.device(device))
    return major in (9, 10) and fa4_importable()


@torch.library.custom_op("zimage::fa4_attention", mutates_args=(), device_types="cuda")
def fa4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-causal attention on (B, S, H, D) tensors through FlashAttention-4; returns (B, S, H, D)."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(query, key, value, softmax_scale=scale, causal=False)
    return out[0] if isinstance(out, tuple) else out


@fa4_attention.register_fake
def _fa4_attention_fake(query, key, value, scale):
    return query.new_empty(query.shape[:-1] + (value.shape[-1],))


# ---- real-valued RoPE ---------------------------------------------------------------------------------
def apply_rope_real(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, D); freqs: (B, S, D/2, 2) float32 (cos, sin). Same rotation as diffusers' complex form,
    computed in float32 and cast back to x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = freqs[..., 0].unsqueeze(2), freqs[..., 1].unsqueeze(2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class RealRopeEmbedder:
    """Drop-in for diffusers' `RopeEmbedder` that returns the rotation table as real (N, D/2, 2) float32."""

    def __init__(self, original):
        self.original = original
        self.theta, self.axes_dims, self.axes_lens = original.theta, original.axes_dims, original.axes_lens
        self.tables: list[torch.Tensor] | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        assert ids.ndim == 2 and ids.shape[-1] == len(self.axes_dims)
        if self.tables is None or self.tables[0].device != ids.device:
            complex_tables = self.original.precompute_freqs_cis(self.axes_dims, self.axes_lens, theta=self.theta)
            self.tables = [torch.view_as_real(t).contiguous().to(ids.device) for t in complex_tables]
        return torch.cat([table[ids[:, i]] for i, table in enumerate(self.tables)], dim=-2)


class RealRopeAttnProcessor:
    """ZSingleStreamAttnProcessor with real-valued RoPE, and optionally FlashAttention-4 for the attention.

    `_attention_backend` / `_parallel_config` are set by diffusers' `set_attention_backend` like on its own
    processors; `use_fa4` routes unmasked attention to `zimage::fa4_attention` on BSHD tensors."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, use_fa4: bool = False):
        self.use_fa4 = use_fa4

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        fused = getattr(attn, "fused_qkv", None)  # fusion.FusedLinear: q/k/v as one GEMM
        if fused is not None:
            query, key, value = fused.project(hidden_states, (attn.to_q, attn.to_k, attn.to_v))
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            if freqs_cis.is_complex():  # the table was not swapped (someone re-created rope_embedder)
                freqs_cis = torch.view_as_real(freqs_cis)
            query = apply_rope_real(query, freqs_cis)
            key = apply_rope_real(key, freqs_cis)
        dtype = query.dtype
        if self.use_fa4 and attention_mask is None and query.is_cuda:
            out = torch.ops.zimage.fa4_attention(query, key, value, query.shape[-1] ** -0.5)
        else:
            if attention_mask is not None and attention_mask.ndim == 2:
                attention_mask = attention_mask[:, None, None, :]
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(dtype)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


def _attention_modules(transformer):
    from diffusers.models.attention_processor import Attention

    return [m for m in transformer.modules() if isinstance(m, Attention)]


def install(transformer, use_fa4: bool = False) -> int:
    """Swap in real-valued RoPE (+ FA4 if asked) on a ZImageTransformer2DModel; returns the modules changed.
    Call before compiling; the attention backend set afterwards (`set_attention_backend`) still applies."""
    if not isinstance(transformer.rope_embedder, RealRopeEmbedder):
        transformer.rope_embedder = RealRopeEmbedder(transformer.rope_embedder)
    modules = _attention_modules(transformer)
    for module in modules:
        previous = module.processor
        processor = RealRopeAttnProcessor(use_fa4=use_fa4)
        processor._attention_backend = getattr(previous, "_attention_backend", None)
        processor._parallel_config = getattr(previous, "_parallel_config", None)
        module.set_processor(processor)
    return len(modules)


def uninstall(transformer) -> None:
    """Back to diffusers' complex RoPE processor."""
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    if isinstance(transformer.rope_embedder, RealRopeEmbedder):
        transformer.rope_embedder = transformer.rope_embedder.original
    for module in _attention_modules(transformer):
        previous = module.processor
        processor = ZSingleStreamAttnProcessor()
        processor._attention_backend = getattr(previous, "_attention_backend", None)
        processor._parallel_config = getattr(previous, "_parallel_config", None)
        module.set_processor(processor)


def sdpa_reference(query, key, value, scale):
    """What fa4_attention computes, in SDPA (for tests and CPU checks): BSHD in, BSHD out."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         scale=scale)
    return out.transpose(1, 2)
