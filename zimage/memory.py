"""Where the pipeline's parts live on the GPU (memory profiles), and giving memory back.

A profile says, per model, whether it stays resident on the GPU or is streamed from pinned CPU memory
layer by layer (diffusers group offloading, prefetched on a side stream), and which tiers need a tiled VAE
decode. fp8 (when on) shrinks what stays resident: transformer 11.5 -> 5.8 GiB, text encoder 7.5 -> 4.1 GiB.

    profile  transformer              text encoder               VAE      for
    full     resident                 resident                   resident 24 GiB and up
    16gb     resident                 resident if fp8, else      resident 16 GiB cards
                                      streamed
    12gb     resident if fp8, else    streamed                   resident, 12 GiB cards
             streamed                                            tiled >= High

`auto` picks the fastest profile whose expected peak for the largest tier fits the card (or the
--gpu-memory-limit), with headroom for the CUDA context and fragmentation. Tiers whose expected peak does
not fit are refused with a message instead of being left to run out of memory.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass

import torch

from .presets import AREA_TOLERANCE, TIERS
from .units import GIB

log = logging.getLogger("zimage.memory")
HEADROOM_GIB = 1.0  # CUDA context (~0.5 GiB, outside the allocator's cap) + fragmentation

# Expected peak allocated GiB per tier, by (profile, fp8). Measured on the H100 with random-full weights under
# the profile's memory cap (docs/PERFORMANCE.md, "VRAM tiers"); "p" marks predictions (not measured: derived
# from the measured rows by swapping bf16 and fp8 weight sizes). Tiled tiers can peak below untiled ones.
EXPECTED_PEAK_GIB: dict[tuple[str, bool], dict[str, float]] = {
    ("full", False): {"Draft": 20.5, "Standard": 21.5, "High": 22.9, "Ultra": 21.5},
    ("full", True): {"Draft": 14.8, "Standard": 15.9, "High": 17.2, "Ultra": 15.9},  # p
    ("16gb", False): {"Draft": 14.4, "Standard": 14.5, "High": 15.6, "Ultra": 14.5},  # p
    ("16gb", True): {"Draft": 12.3, "Standard": 12.6, "High": 14.0, "Ultra": 12.7},  # Draft p
    ("12gb", False): {"Draft": 3.0, "Standard": 3.2, "High": 3.2, "Ultra": 3.2},  # p
    ("12gb", True): {"Draft": 8.5, "Standard": 8.5, "High": 8.5, "Ultra": 8.5},  # Draft p
}
PROFILE_ORDER = ("full", "16gb", "12gb")  # fastest first


@dataclass(frozen=True)
class Profile:
    name: str
    transformer_streamed: bool
    text_encoder_streamed: bool
    text_encoder_fp8: bool
    tiled_decode_tiers: tuple[str, ...]


def profile_spec(name: str, fp8: bool) -> Profile:
    always_tiled = tuple(t.name for t in TIERS.values() if t.vae_tiling)  # tiers tiled under every profile
    if name == "full":
        return Profile(name, False, False, False, always_tiled)
    if name == "16gb":
        return Profile(name, False, not fp8, fp8, always_tiled)
    if name == "12gb":  # fp8: the text encoder is streamed in fp8 (half the bytes over PCIe per request)
        return Profile(name, not fp8, True, fp8, ("High", *always_tiled))
    raise ValueError(f"unknown memory profile {name!r}")


def cuda_device(device: str) -> torch.device:
    """'cuda' -> cuda:<current>: some CUDA memory APIs refuse a device without an index."""
    dev = torch.device(device)
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def configure_allocator() -> None:
    """expandable_segments lets freed blocks be returned and re-grown without fragmenting the pool.

    Must run before CUDA initialises; a value the user set is kept.
    """
    if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"


def release_memory(device: str, collect: bool = True) -> None:
    """Drop unreachable tensors and hand cached GPU blocks back to the driver. `collect` False: the caller has just
    collected (the engine does it while the host waits for a generation's last kernels)."""
    if collect:
        gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def gpu_memory(device: str) -> tuple[int, int] | None:
    """(free, total) bytes on the device, or None off CUDA."""
    if not device.startswith("cuda"):
        return None
    return torch.cuda.mem_get_info(cuda_device(device))


def apply_memory_limit(device: str, limit_gib: float) -> None:
    """Cap this process's GPU allocations (like a smaller card); must run before the model is placed."""
    if limit_gib <= 0 or not device.startswith("cuda"):
        return
    dev = cuda_device(device)
    total = torch.cuda.get_device_properties(dev).total_memory
    fraction = min(1.0, limit_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    log.info("GPU memory capped at %.1f GiB (%.3f of %.1f GiB)", limit_gib, fraction, total / GIB)


# Extra memory an untiled FLUX-VAE decode allocates per output pixel (bf16 activations at full resolution plus
# GroupNorm's fp32 upcast). Upper bound from the H100 runs: peak grew 2.4 KiB per pixel from Draft to High
# (decode and transformer activations together); rounded up.
DECODE_BYTES_PER_PIXEL = 3072


def _cap_fraction(dev: torch.device) -> float:
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.8
    return getter(dev) if getter else 1.0


def fits_untiled_decode(device: str, width: int, height: int, copies: int = 1) -> bool:
    """Whether a whole-image decode fits in what the allocator can still hand out; if not, tile it. `copies`: room
    for that many decodes' transients at once (capturing a decode graph runs it eagerly first)."""
    if not device.startswith("cuda"):
        return True
    dev = cuda_device(device)
    free_card, total = torch.cuda.mem_get_info(dev)
    reserved, allocated = torch.cuda.memory_reserved(dev), torch.cuda.memory_allocated(dev)
    cap = total * _cap_fraction(dev)
    available = min(free_card + reserved - allocated, cap - allocated)
    return copies * width * height * DECODE_BYTES_PER_PIXEL <= available


def room_for_decode_graphs(usable: float | None, fp8: bool, extra_gib: float = 0.0) -> bool:
    """Whether the `full` profile can keep the VAE decode as CUDA graphs (speed switch decode_graphs): room for its
    largest tier's peak plus two untiled decodes of the largest untiled tier (capturing one runs it eagerly first,
    and the graph pool then keeps its transient), with the usual headroom. A capture that runs out of memory would
    leave the memory it had mapped in the graph pool for good, so the decision is made here, up front (H200, fp8:
    yes; a 24 GiB card: no). `extra_gib`: more in use beside the model (LoRA slots, merge mode's weight copy)."""
    if usable is None:
        return False
    pixels = max(t.area for t in TIERS.values() if not t.vae_tiling) * (1 + AREA_TOLERANCE)
    need = (max(EXPECTED_PEAK_GIB[("full", fp8)].values()) + 2 * pixels * DECODE_BYTES_PER_PIXEL / GIB + HEADROOM_GIB
            + extra_gib)
    return need <= usable


def usable_gib(device: str) -> float | None:
    """Memory this process may use: the card's total, or less under a per-process cap."""
    if not device.startswith("cuda"):
        return None
    dev = cuda_device(device)
    total = torch.cuda.get_device_properties(dev).total_memory
    return total * _cap_fraction(dev) / GIB


def choose_profile(setting: str, usable: float | None, fp8: bool, extra_gib: float = 0.0) -> str:
    """`auto`: the fastest profile whose largest tier fits `usable` GiB (None: no GPU, nothing to fit), with
    `extra_gib` more in use (LoRA slots)."""
    if setting != "auto":
        return setting
    if usable is None:
        return "full"
    for name in PROFILE_ORDER:
        if max(EXPECTED_PEAK_GIB[(name, fp8)].values()) + extra_gib + HEADROOM_GIB <= usable:
            return name
    return PROFILE_ORDER[-1]


def refusal(profile: str, fp8: bool, tier: str, usable: float | None, extra_gib: float = 0.0) -> str | None:
    """Why `tier` cannot be served by `profile` on this card, or None if it can (`extra_gib`: LoRA slots and
    cache, resident beside the model)."""
    if usable is None:
        return None
    need = EXPECTED_PEAK_GIB[(profile, fp8)][tier] + extra_gib
    if need + HEADROOM_GIB <= usable:
        return None
    ok = [t for t, gib in EXPECTED_PEAK_GIB[(profile, fp8)].items() if gib + extra_gib + HEADROOM_GIB <= usable]
    instead = f"use {', '.join(ok)}" if ok else "no preset fits; use a GPU with more memory"
    return (f"{tier} needs about {need:.1f} GiB of GPU memory with the {profile} memory profile"
            f"{' and fp8' if fp8 else ''}{' and LoRA slots' if extra_gib else ''}, and this GPU allows {usable:.1f} GiB: {instead}")


class Placement:
    """Puts text encoder, transformer and VAE where a profile says, and moves them when memory is short."""

    def __init__(self, pipe, device: str, profile: Profile, fp8: bool):
        self.pipe, self.device, self.profile, self.fp8 = pipe, device, profile, fp8
        self.text_encoder_shed = False

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def place(self) -> None:
        """Move each model to its place. fp8 weights are quantized as they arrive, one Linear at a time, so
        the bf16 copy of a model never has to fit on the GPU at once (it would not, under a 12 GiB cap)."""
        from . import speed

        pipe, p = self.pipe, self.profile
        pipe.vae.to(self.device)
        if p.transformer_streamed:
            stream_from_cpu(pipe.transformer, self.device)
        elif self.fp8:
            speed.quantize_fp8(pipe.transformer, device=self.device)
        else:
            pipe.transformer.to(self.device)
        if p.text_encoder_streamed:
            if p.text_encoder_fp8:  # quantized on the GPU a layer at a time, kept in host memory
                speed.quantize_fp8(pipe.text_encoder, excluded=(), device=self.device, home="cpu")
            stream_from_cpu(pipe.text_encoder, self.device)
        elif p.text_encoder_fp8:
            speed.quantize_fp8(pipe.text_encoder, excluded=(), device=self.device)
        else:
            pipe.text_encoder.to(self.device)

    @property
    def text_encoder_device(self) -> str:
        """Where encode_prompt's inputs go: the GPU, unless the text encoder was shed to the CPU."""
        return "cpu" if self.text_encoder_shed else self.device

    def plan_tiled_decode(self, tier: str) -> bool:
        """The memory plan's decode decision for a job of `tier`, made once when the job is resolved."""
        return tier in self.profile.tiled_decode_tiers

    def decode_tiled(self, planned: bool, width: int, height: int) -> bool:
        """At decode time: the plan, or tiles anyway when a whole-image decode no longer fits what is free."""
        return planned or not fits_untiled_decode(self.device, width, height)

    def before_encode(self) -> None:
        """Bring the text encoder back if an earlier OOM moved it off the GPU."""
        if self.text_encoder_shed:
            self._drop_encoder_graphs()
            self.pipe.text_encoder.to(self.device)
            self.text_encoder_shed = False

    def shed_text_encoder(self) -> bool:
        """Move a resident bf16 text encoder (7.5 GiB) to the CPU to make room. True if that freed anything.
        Streamed or fp8 encoders stay where they are: the first holds nothing between uses, the second is
        cheaper to keep than to rebuild."""
        p = self.profile
        if not self.on_gpu or self.text_encoder_shed or p.text_encoder_streamed or p.text_encoder_fp8:
            return False
        self._drop_encoder_graphs()
        self.pipe.text_encoder.to("cpu")
        self.text_encoder_shed = True
        log.info("text encoder moved to CPU to make room")
        return True

    def _drop_encoder_graphs(self) -> None:
        """CUDA graphs read the encoder's weights at fixed addresses: a move invalidates them."""
        from . import cudagraph

        graphs = cudagraph.text_encoder_graphs(self.pipe.text_encoder)
        if graphs is not None:
            graphs.clear()


def stream_from_cpu(module: torch.nn.Module, device: str) -> None:
    """Keep `module` in pinned CPU memory and stream it to the GPU one block at a time, the next block
    copying on a side stream while the current one computes (diffusers group offloading)."""
    from diffusers.hooks import apply_group_offloading

    on_gpu = device.startswith("cuda")
    apply_group_offloading(module, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=on_gpu,
                           non_blocking=on_gpu)
