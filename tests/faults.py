"""Fault injection into the real model: forward hooks that raise real exceptions from inside a stage."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def raise_in_forward(module: torch.nn.Module, times: int = 1, exc_factory=None):
    """The next `times` forward calls of `module` raise (default: torch.OutOfMemoryError, as CUDA does).

    Yields a record: {'raised': n, 'calls': n, 'tiling': [vae.use_tiling seen at each call, if any]}."""
    exc_factory = exc_factory or (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB "
                                                                 "(injected by the test)"))
    record = {"raised": 0, "calls": 0}

    def hook(mod, args):
        record["calls"] += 1
        if record["raised"] < times:
            record["raised"] += 1
            raise exc_factory()

    handle = module.register_forward_pre_hook(hook)
    try:
        yield record
    finally:
        handle.remove()
