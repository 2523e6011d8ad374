"""Projections that read the same input, computed as one GEMM: q/k/v of every attention, w1/w3 of every SwiGLU.

Why: each DiT block multiplied its normalized input by to_q, to_k and to_v (and the FFN input by w1 and w3) in
separate GEMMs, and under fp8 quantized that input once per GEMM (the H100 profile of 2026-11-24: 7 GEMM
launches per block, each fp8 input written once per consumer). One GEMM over the concatenated weight reads and
quantizes the input once and runs fewer, larger GEMMs. With fp8 the result is the same arithmetic: the weight
scales are per output row and the activation scales per token, so concatenating rows changes nothing but the
launch count.

How (`install`, after placement and fp8 quantization, before LoRA slots and compile): a `FusedLinear` owns the
concatenated weight (and fp8 row scales) as buffers, and each original Linear's weight becomes a *view* of its
rows. The original modules stay where they were, with their names and shapes, so LoRA key conversion, merge
mode (which writes the weight in place, through the view) and the state-dict keys see nothing different; the
fused weight is never stored twice. Forward runs the fused GEMM and splits it; a LoRA branch (lora.LoraLinear,
branch mode) on a part is added to that part's slice. Attention uses it through fastattn's processor, the FFN
through `FusedFeedForward` (diffusers' FeedForward with its forward fused).

The views tie the parts to the owner's storage, so a fused model must not be moved or re-quantized afterwards
(`.to(device)` gives every parameter its own storage): the engine fuses only a transformer that stays resident
(memory profiles whose transformer is not streamed) and `check` verifies the ties after loading.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_z_image import FeedForward

from . import kernels  # noqa: F401  (registers the zimage:: ops the fused paths call)
from .fp8 import Fp8Linear, scaled_linear, scaled_mm

log = logging.getLogger("zimage.fusion")


def base_linear(module):
    """The Linear under a LoRA wrapper (lora.LoraLinear keeps it as `.base`)."""
    return getattr(module, "base", module)


class FusedLinear(torch.nn.Module):
    """Linears sharing one input as one GEMM. Owns the concatenated weight; each part's weight is a view of it."""

    def __init__(self, parts: list[torch.nn.Module]):
        super().__init__()
        bases = [base_linear(p) for p in parts]
        self.fp8 = isinstance(bases[0], Fp8Linear)
        self.in_features = bases[0].in_features
        self.sizes = [b.out_features for b in bases]
        self.register_buffer("weight", torch.cat([b.weight.detach() for b in bases]), persistent=False)
        if self.fp8:
            self.register_buffer("weight_scale", torch.cat([b.weight_scale for b in bases], dim=1), persistent=False)
        self.parts = bases  # plain list: not submodules (they live where they were)
        offset = 0
        for base, size in zip(bases, self.sizes):
            base.weight = torch.nn.Parameter(self.weight[offset:offset + size], requires_grad=False)
            if self.fp8:
                base.weight_scale = self.weight_scale[:, offset:offset + size]
            offset += size

    @staticmethod
    def fusable(parts) -> bool:
        bases = [base_linear(p) for p in parts]
        kinds = {type(b) for b in bases}
        if len(kinds) != 1 or not kinds <= {torch.nn.Linear, Fp8Linear}:
            return False
        first = bases[0]
        return all(b.bias is None and b.in_features == first.in_features and b.weight.dtype == first.weight.dtype
                   and b.weight.device == first.weight.device for b in bases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            return scaled_linear(x, self.weight, self.weight_scale, None)
        return F.linear(x, self.weight)

    def project(self, x: torch.Tensor, parts) -> list[torch.Tensor]:
        """Each part's output: its slice of the fused GEMM, plus the part's LoRA branch where one is active.

        The branch is added in place, into the slice: every part's output keeps the slice's layout whether a branch
        runs or not. (A new contiguous tensor for the parts with a branch sent the attention and FFN math down other
        CPU kernels: an all-zero branch then changed the latents by ~3e-6 on an AMD EPYC host, 2026-12-02.)"""
        outs = list(self(x).split(self.sizes, dim=-1))
        for i, (out, part) in enumerate(zip(outs, parts)):
            if getattr(part, "active", False):
                branch = part.branch(x).to(out.dtype)
                # autograd refuses in-place changes to one of several views (training through this path)
                outs[i] = out + branch if torch.is_grad_enabled() else out.add_(branch)
        return outs

    def intact(self) -> bool:
        """Every part's weight (and fp8 scales) still lies in this module's storage."""
        storage = self.weight.untyped_storage().data_ptr()
        ok = all(b.weight.untyped_storage().data_ptr() == storage for b in self.parts)
        if self.fp8:
            scales = self.weight_scale.untyped_storage().data_ptr()
            ok = ok and all(b.weight_scale.untyped_storage().data_ptr() == scales for b in self.parts)
        return ok

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, sizes={self.sizes}{', e4m3' if self.fp8 else ''}"


class FusedFeedForward(FeedForward):
    """diffusers' Z-Image FeedForward (w2(silu(w1 x) * w3 x)) with w1/w3 as one GEMM (`fused_w13`); `install`
    swaps a FeedForward's class to it (a module-level class: Dynamo's precompile cache pickles it by name)."""

    swiglu_kernel = False  # SwiGLU + fp8 quantization of w2's input as one op (kernels.swiglu_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w2 = base_linear(self.w2)
        if self.swiglu_kernel and isinstance(w2, Fp8Linear) and not getattr(self.w2, "active", False):
            return self._forward_quantized(x, w2)
        h1, h3 = self.fused_w13.project(x, (self.w1, self.w3))
        return self.w2(F.silu(h1) * h3)

    def _forward_quantized(self, x: torch.Tensor, w2) -> torch.Tensor:
        """w2's fp8 input straight from the SwiGLU (one pass over the hidden rows), then w2's fp8 GEMM."""
        if getattr(self.w1, "active", False) or getattr(self.w3, "active", False):
            h = torch.cat(self.fused_w13.project(x, (self.w1, self.w3)), dim=-1)  # LoRA branches on w1/w3
        else:
            h = self.fused_w13(x)
        q, scale = torch.ops.zimage.swiglu_quant(h)
        y = scaled_mm(q, scale, w2.weight, w2.weight_scale, w2.bias, x.dtype)
        return y.reshape(*x.shape[:-1], w2.out_features)


def install(transformer: torch.nn.Module, swiglu_kernel: bool = False) -> int:
    """Fuse q/k/v of every attention and w1/w3 of every FeedForward in `transformer`; returns how many groups.
    Call after fp8 quantization and before LoRA slots and compile; never move the transformer afterwards.
    `swiglu_kernel`: fp8 FFNs quantize w2's input in the SwiGLU op (kernels.swiglu_quant)."""
    count = 0
    for module in list(transformer.modules()):
        if isinstance(module, Attention) and not hasattr(module, "fused_qkv"):
            parts = [getattr(module, name, None) for name in ("to_q", "to_k", "to_v")]
            if None not in parts and FusedLinear.fusable(parts):
                module.fused_qkv = FusedLinear(parts)
                count += 1
        elif type(module) is FeedForward and FusedLinear.fusable([module.w1, module.w3]):
            module.fused_w13 = FusedLinear([module.w1, module.w3])
            module.__class__ = FusedFeedForward
            module.swiglu_kernel = swiglu_kernel
            count += 1
    log.info("fused projections: %d groups (q/k/v, w1/w3)", count)
    return count


def uninstall(transformer: torch.nn.Module) -> None:
    """Back to separate GEMMs (the parts keep their weights, as views of the former owner's storage)."""
    for module in list(transformer.modules()):
        if type(module) is FusedFeedForward:
            module.__class__ = FeedForward
            del module.fused_w13
            module.__dict__.pop("swiglu_kernel", None)
        if "fused_qkv" in getattr(module, "_modules", {}):
            del module.fused_qkv


def fused_groups(transformer: torch.nn.Module) -> list[FusedLinear]:
    return [m for m in transformer.modules() if isinstance(m, FusedLinear)]


def check(transformer: torch.nn.Module) -> None:
    """RuntimeError if a fused group's parts no longer share its storage (the model was moved or re-quantized
    after fusing: the fused GEMM would then ignore changes to the parts, e.g. a merged LoRA)."""
    broken = [g for g in fused_groups(transformer) if not g.intact()]
    if broken:
        raise RuntimeError(f"{len(broken)} fused projection groups lost their shared weights (the transformer was "
                           "moved or re-quantized after fusion.install)")
