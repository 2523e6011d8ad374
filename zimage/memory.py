"""Where the pipeline's parts live on the GPU, and giving memory back.

`Placement` owns the device placement of the three models. The engine asks it to make room when a
stage runs out of memory (the OOM ladder's lower-memory plan) and to restore the fast layout afterwards.
"""

from __future__ import annotations

import gc
import logging
import os

import torch

log = logging.getLogger("zimage.memory")
GIB = 2**30


def configure_allocator() -> None:
    """expandable_segments lets freed blocks be returned and re-grown without fragmenting the pool.

    Must run before CUDA initialises; a value the user set is kept.
    """
    if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"


def release_memory(device: str) -> None:
    """Drop unreachable tensors and hand cached GPU blocks back to the driver."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def gpu_memory(device: str) -> tuple[int, int] | None:
    """(free, total) bytes on the device, or None off CUDA."""
    if not device.startswith("cuda"):
        return None
    return torch.cuda.mem_get_info(torch.device(device))


def resolve_profile(setting: str, device: str) -> str:
    if setting != "auto":
        return setting
    return "full"


class Placement:
    """Device placement of text encoder, transformer and VAE for one memory profile."""

    def __init__(self, pipe, device: str, profile: str):
        self.pipe, self.device, self.profile = pipe, device, profile
        self.text_encoder_shed = False

    def place(self) -> None:
        self.pipe.to(self.device)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def before_encode(self) -> None:
        """Bring the text encoder back if an earlier OOM moved it off the GPU."""
        if self.text_encoder_shed:
            self.pipe.text_encoder.to(self.device)
            self.text_encoder_shed = False

    def shed_text_encoder(self) -> bool:
        """Move the text encoder (8 GB in bf16) to the CPU to make room. True if that freed anything."""
        if not self.on_gpu or self.text_encoder_shed:
            return False
        self.pipe.text_encoder.to("cpu")
        self.text_encoder_shed = True
        log.info("text encoder moved to CPU to make room")
        return True
