"""fp8 weights as plain tensors: a Linear that keeps its weight in float8 e4m3 with one scale per output row,
quantizes its input per token on the fly, and multiplies with `torch._scaled_mm`.

Why our own and not torchao's `Float8DynamicActivationFloat8WeightConfig` (same arithmetic: rowwise weight
scales, dynamic per-token activation scales): torchao keeps the weight in a tensor subclass, and on the H100
(2026-11-24) that cost twice. The host could not dispatch the subclass fast enough (GPU busy 58 % of the fp8
denoise window, pytorch/ao issue 1930), and Dynamo guarded on every layer's subclass metadata, so the 30
"repeated" blocks compiled one by one (first call 196 s, later 5+ minutes). Here the weight and its scales are
ordinary parameters/buffers: every block shares one compiled graph, as in bf16, Inductor fuses the activation
quantization into one reduction kernel in front of the GEMM, and nothing runs in Python per call.

`_scaled_mm` with rowwise scales needs compute capability >= 8.9 on CUDA (CPU runs it too, for the tests) and
the inner and outer dimensions in multiples of 16; other Linears stay as they are.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
_TINY = 1e-12  # an all-zero row gets this amax instead of dividing by zero


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float -> (e4m3, float32 scale per row) with x ~= q * scale; the row's largest magnitude maps to 448."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def quantizable(linear: torch.nn.Linear) -> bool:
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ b) for an e4m3 weight (out, in) with row scales (1, out): x quantized per token, one fp8 GEMM."""
    xq, x_scale = quantize_rows(x.reshape(-1, weight.shape[1]))
    return scaled_mm(xq, x_scale, weight, weight_scale, bias, x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The fp8 GEMM of rows already quantized (xq (rows, in) e4m3, x_scale (rows, 1)): (rows, out) in out_dtype."""
    # weight.t() is column-major, the layout cuBLASLt/CUTLASS want for the second operand.
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=out_dtype)
    if bias is not None:  # outside the GEMM: not every fp8 kernel takes a bias (the DiT's have none)
        y = y + bias.to(out_dtype)
    return y


class Fp8Linear(torch.nn.Module):
    """y = x W^T + b with W stored as e4m3 rows x per-row scales; x quantized per token in forward."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = torch.nn.Parameter(weight, requires_grad=False)  # (out, in) e4m3
        self.register_buffer("weight_scale", weight_scale)  # (1, out) float32: _scaled_mm's scale_b layout
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Fp8Linear":
        w = linear.weight.detach()
        q, scale = quantize_rows(w)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale.reshape(1, -1).contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_linear(x, self.weight, self.weight_scale, self.bias)

    def _apply(self, fn, recurse=True):
        # Follow device moves, never dtype casts: `module.to(torch.bfloat16)` (from_pipe, a LoRA loader) would
        # otherwise turn the e4m3 weight into bf16 and round the float32 scales.
        def keep_dtype(t):
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3"


def quantize_module(module: torch.nn.Module, excluded: tuple[str, ...] = (), device: str | None = None,
                    home: str | None = None) -> int:
    """Replace every quantizable Linear in `module` (names containing an `excluded` part stay) by an Fp8Linear;
    returns how many. With `device`, each Linear moves there just before it is quantized and the rest follows
    at the end, so peak memory is the fp8 model plus one bf16 layer. With `home` too, each quantized layer and
    then the rest go there instead (quantize on the GPU, keep in host memory: a model streamed to the GPU)."""
    count = 0
    # Names, not modules: a list holding every original Linear would keep all their bf16 weights alive (on the
    # device, once moved) until the end, i.e. the whole bf16 model beside the fp8 one.
    names = [fqn for fqn, mod in module.named_modules() if isinstance(mod, torch.nn.Linear)
             and not any(e in fqn for e in excluded) and quantizable(mod)]
    for fqn in names:
        parent_name, _, child = fqn.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, child)
        if device is not None:
            linear.to(device)
        quantized = Fp8Linear.from_linear(linear)
        setattr(parent, child, quantized if home is None else quantized.to(home))
        del linear, quantized
        count += 1
    if home is not None or device is not None:
        module.to(home or device)
    return count


def has_fp8(module: torch.nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in module.modules())
