"""Speed switches applied to a placed pipeline: attention backend, fp8 weights, regional compile.

Order matters: quantize to fp8 *before* compiling (quantizing a compiled model took 391 s to first image
and produced NaN pixels on the H100; docs/PERFORMANCE.md).
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


def fp8_wanted(setting: str, device: str, dtype: torch.dtype) -> bool:
    """auto: on where supported and the weights are bf16 (torchao's rowwise fp8 quantizes bf16 only)."""
    if setting == "off":
        return False
    if dtype != torch.bfloat16:
        if setting == "on":
            raise RuntimeError("--fp8 on needs --dtype bf16 (torchao's rowwise fp8 quantizes bf16 weights); "
                               "use --dtype bf16, or --fp8 off or auto")
        return False
    supported = fp8_supported(device)
    if setting == "on" and not supported:
        raise RuntimeError("--fp8 on needs a CUDA GPU with compute capability >= 8.9 and torchao installed; "
                           "use --fp8 auto or off")
    return supported


def quantize_fp8(module: torch.nn.Module, excluded: tuple[str, ...] = FP8_EXCLUDED, device: str | None = None) -> int:
    """fp8 rowwise (dynamic activation + weight) on every Linear except `excluded`; returns how many.

    With `device`, each Linear moves there just before it is quantized and the rest follows at the end, so
    peak memory is the fp8 model plus one bf16 layer (a 12 GiB card never holds the 11.5 GiB bf16 copy)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    count = 0
    for fqn, mod in list(module.named_modules()):
        if isinstance(mod, torch.nn.Linear) and not any(e in fqn for e in excluded):
            if device is not None:
                mod.to(device)
            quantize_(mod, config)
            count += 1
    if device is not None:
        module.to(device)
    return count


def use_compile_cache(folder) -> None:
    """Persist Inductor's compiled kernels and FX graphs, so a restart recompiles from cache (seconds,
    not minutes). A folder the user set through TORCHINDUCTOR_CACHE_DIR is kept."""
    import os

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    import torch._dynamo

    # fp8 tensor subclasses can make each repeated block its own compile; the default limit (8) would then
    # silently leave the later blocks eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def compile_transformer(transformer, dynamic: bool | None = None, mode: str | None = None) -> None:
    """Regional compile: each repeated ZImageTransformerBlock is compiled once and reused (21 s vs minutes)."""
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=dynamic, mode=mode)


def compile_text_encoder(text_encoder, mode: str | None = None) -> None:
    """Regional compile of the text encoder's decoder layers (the engine pads prompts to 64-token buckets, so
    they see a few lengths; warm-up shows them two). Eager it is launch-bound (58-81 ms where the math needs
    ~5 ms); compiling the whole 36-layer model instead took ~4 minutes on the H100."""
    for layer in text_encoder.layers:
        layer.compile(mode=mode)
