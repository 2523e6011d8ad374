"""Re-save a LoRA from diffusers' layout in the layouts other Z-Image tools write (test fixtures for the loader).

    python -m zimage.demo.lora_formats models/tiny-demo-loras/outline.safetensors tests/fixtures/loras

reads the source (`<name>.safetensors`, diffusers/peft: transformer.<layer>.lora_A/lora_B.weight, r and
lora_alpha in the metadata) and writes:

    <name>-kohya.safetensors        musubi-tuner / sd-scripts: lora_unet_layers_0_attention_to_q.lora_down.weight,
                                    .lora_up.weight and .alpha (a scalar), layer names with '_' for '.'
    <name>-comfyui.safetensors      ComfyUI / ai-toolkit: diffusion_model.layers.0.attention.to_q.lora_A.weight,
                                    .lora_B.weight and .alpha
    <name>-comfyui-qkv.safetensors  what musubi's convert_z_image_lora_to_comfy.py writes for ComfyUI's Z-Image
                                    model: q, k and v fused into attention_qkv (down stacked, up block-diagonal,
                                    alpha x 3) and to_out.0 named attention_out

All hold the same numbers (alpha is stored, not folded in), so the service must draw the same picture from
each; tests/test_lora.py checks that it does. The service reads them all through diffusers' conversion
(lora.convert), never through this module.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch


def read_diffusers(path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, dict]:
    """{layer: (down, up)}, lora_alpha and the file's metadata, from a diffusers-layout LoRA with one r/lora_alpha."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"):
        raise SystemExit("rank_pattern/alpha_pattern/rslora LoRAs are not converted by this script")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"transformer\.(.+)\.lora_([AB])\.weight", key)
        if not match:
            raise SystemExit(f"unexpected key {key!r}: not a diffusers-layout LoRA")
        layers.setdefault(match[1], {})[match[2]] = tensor
    pairs = {name: (p["A"], p["B"]) for name, p in layers.items()}
    rank = next(iter(pairs.values()))[0].shape[0]
    return pairs, float(config.get("lora_alpha", config.get("r", rank))), metadata


def kohya(pairs, alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for name, (down, up) in pairs.items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
        out[f"{key}.alpha"] = torch.tensor(alpha, dtype=down.dtype)
    return out


def comfyui(pairs, alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for name, (down, up) in pairs.items():
        key = "diffusion_model." + name
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = down, up
        out[f"{key}.alpha"] = torch.tensor(alpha, dtype=down.dtype)
    return out


def comfyui_qkv(pairs, alpha: float) -> dict[str, torch.Tensor]:
    """kohya's layout as musubi-tuner's ComfyUI converter rewrites it (its forward direction)."""
    out = kohya({n: p for n, p in pairs.items() if not re.search(r"\.attention\.to_[qkv]$", n)}, alpha)
    out = {k.replace("_attention_to_out_0.", "_attention_out."): v for k, v in out.items()}
    blocks = sorted({n[: -len(".to_q")] for n in pairs if n.endswith(".attention.to_q")})
    for block in blocks:
        downs = [pairs[f"{block}.to_{p}"][0] for p in "qkv"]
        ups = [pairs[f"{block}.to_{p}"][1] for p in "qkv"]
        rank, rows = downs[0].shape[0], ups[0].shape[0]
        up = torch.zeros(3 * rows, 3 * rank, dtype=ups[0].dtype)
        for i, u in enumerate(ups):
            up[i * rows:(i + 1) * rows, i * rank:(i + 1) * rank] = u
        key = "lora_unet_" + block.replace(".", "_") + "_qkv"
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = torch.cat(downs), up
        out[f"{key}.alpha"] = torch.tensor(alpha * 3, dtype=downs[0].dtype)
    return out


LAYOUTS = {"kohya": kohya, "comfyui": comfyui, "comfyui-qkv": comfyui_qkv}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a diffusers-layout LoRA (.safetensors)")
    parser.add_argument("out", type=Path, help="folder to write the copies to")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    pairs, alpha, _ = read_diffusers(args.source)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.source.name[: -len(".safetensors")]
    for layout, convert in LAYOUTS.items():
        tensors = {k: v.contiguous() for k, v in sorted(convert(pairs, alpha).items())}
        target = args.out / f"{name}-{layout}.safetensors"
        save_file(tensors, str(target), metadata={"format": "pt", "converted_from": args.source.name,
                                                  "layout": layout})
        print(f"{target}: {len(tensors)} tensors", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
