"""Speed switches applied to a placed pipeline: attention backend, fp8 weights, regional compile.

Order matters: quantize to fp8 *before* compiling (quantizing a compiled model took 391 s to first image
and produced NaN pixels on the H100; ../shared/ZIMAGE.md).
"""

from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger("zimage.speed")

# Layers whose precision the image depends on most: timestep/caption/patch embedders, the final
# projection, and the adaLN modulation. They stay bf16 under fp8 (vllm-omni does the same).
FP8_EXCLUDED = ("t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer", "adaLN")


def available_attention_backends(device: str) -> list[str]:
    """Backends worth trying on this machine, fastest first by the H100 measurements in docs/PERFORMANCE.md."""
    if not device.startswith("cuda"):
        return ["native"]
    names = []
    if importlib.util.find_spec("flash_attn_interface") is not None:  # FlashAttention 3 (Hopper)
        names.append("_flash_3")
    if importlib.util.find_spec("flash_attn") is not None:
        names.append("flash")
    names += ["native", "_native_cudnn", "_native_flash", "_native_efficient"]
    return names


def choose_attention_backend(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    return available_attention_backends(device)[0]


def apply_attention_backend(transformer, backend: str) -> None:
    if backend == "native":
        return  # diffusers' default; set_attention_backend would only log an 'experimental' warning
    transformer.set_attention_backend(backend)


def fp8_supported(device: str) -> bool:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    if importlib.util.find_spec("torchao") is None:
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def fp8_wanted(setting: str, device: str) -> bool:
    if setting == "off":
        return False
    supported = fp8_supported(device)
    if setting == "on" and not supported:
        raise RuntimeError("--fp8 on needs a CUDA GPU with compute capability >= 8.9 and torchao installed; "
                           "use --fp8 auto or off")
    return supported


def quantize_fp8(module: torch.nn.Module, excluded: tuple[str, ...] = FP8_EXCLUDED) -> int:
    """fp8 rowwise (dynamic activation + weight) on every Linear except `excluded`. Returns layers quantized."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    count = 0

    def wanted(mod: torch.nn.Module, fqn: str) -> bool:
        nonlocal count
        ok = isinstance(mod, torch.nn.Linear) and not any(e in fqn for e in excluded)
        count += ok
        return ok

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=wanted)
    return count


def compile_transformer(transformer) -> None:
    """Regional compile: each repeated ZImageTransformerBlock is compiled once and reused (21 s vs minutes)."""
    transformer.compile_repeated_blocks(fullgraph=True)
