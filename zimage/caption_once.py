"""The caption refiner once per generation instead of at every step (speed switch `caption_once`).

Why: Z-Image's context refiner (two blocks over the caption's tokens) has no timestep modulation, and its input is
the prompt's embeddings alone, so its output is the same at every step of a generation. diffusers' forward still
runs it, with the caption embedder, at each of the 8 steps. Measured (H100, Standard, one engine, 2026-12-07): fp8
+1.0 ms, bf16 -1.1 ms, within the noise (the two blocks' weight bytes say ~-0.8 / -1.6 ms); latents bit-identical.

How: `scope(transformer)` turns it on for one pipeline call (stages.Stages.denoise), since a merged LoRA may change
the refiner's weights between generations. A forward pre-hook sees each step's caption (`cap_feats`). When it is not
the caption refined last in this scope (the same tensors, unmodified), the hook runs the caption path through
diffusers' own methods: padding to 32, the embedder, the pad token and RoPE, and the refiner's blocks. It keeps the
result in a buffer, one per shape. During the forward, the context refiner (cudagraph.GraphedBlocks.reuse) then
returns that buffer instead of running its blocks. Each buffer is allocated once and rewritten in place, so a step
graph captured over it reads the next generation's caption too (the graph's key says whether the caption is
reused). Outside a scope, with omni-mode inputs or with gradients, the forward is diffusers' own.
"""

from __future__ import annotations

import contextlib

import torch


class CaptionOnce:
    def __init__(self, transformer):
        self.transformer = transformer
        self.enabled = True  # the switch (benchmarks flip it in one engine: bench/latency.py --ab co)
        self.active = False  # inside scope()
        self.reusing = False  # this forward's context refiner returns `current` (the step graphs' key reads it)
        self.current: torch.Tensor | None = None
        self.refinements = 0  # caption refinements run (tests, describe)
        self._last: tuple = ()  # (tensor, version) of the caption refined last in this scope
        self._buffers: dict = {}  # (shape, dtype, device) -> the refined caption; never freed (graphs read them)

    def before_forward(self, module, args, kwargs) -> None:
        self.reusing = False
        if not (self.enabled and self.active) or torch.is_grad_enabled():
            return
        x = args[0] if args else kwargs.get("x")
        caption = args[2] if len(args) > 2 else kwargs.get("cap_feats")
        if (not isinstance(caption, list | tuple) or not caption or not all(isinstance(c, torch.Tensor) for c in caption)
                or not isinstance(x, list | tuple) or any(isinstance(v, list) for v in x)
                or any(kwargs.get(k) is not None for k in ("siglip_feats", "image_noise_mask"))):
            return  # omni mode or something unexpected: diffusers' forward as it is
        if self.transformer.cap_pad_token.device != caption[0].device:
            return  # the weights are elsewhere until the forward moves them (offload hooks)
        key = tuple((c, c._version) for c in caption)
        if len(key) != len(self._last) or any(a is not b or v != w for (a, v), (b, w) in zip(key, self._last)):
            self.current = self._refine(list(caption))
            self._last = key
        self.reusing = True

    def _refine(self, caption: list[torch.Tensor]) -> torch.Tensor:
        """diffusers' caption path of ZImageTransformer2DModel.forward (standard mode), through its own methods."""
        from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

        model, device = self.transformer, caption[0].device
        padded, positions, pad_masks = [], [], []
        for feat in caption:
            out, pos, pad, _, _ = model._pad_with_ids(feat, (len(feat) + (-len(feat)) % SEQ_MULTI_OF, 1, 1),
                                                      (1, 0, 0), device)
            padded.append(out)
            positions.append(pos)
            pad_masks.append(pad)
        lengths = [len(p) for p in padded]
        embedded = model.cap_embedder(torch.cat(padded, dim=0))
        feats, freqs, mask, _, _ = model._prepare_sequence(list(embedded.split(lengths, dim=0)), positions, pad_masks,
                                                           model.cap_pad_token, None, device)
        for layer in model.context_refiner:  # `reusing` is off: the blocks run (on the stack's kernels if any)
            feats = layer(feats, mask, freqs)
        self.refinements += 1
        key = (tuple(feats.shape), feats.dtype, feats.device)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty_like(feats)
        buffer.copy_(feats)
        return buffer

    def reused(self) -> torch.Tensor | None:
        """The refined caption, where this forward reuses it (cudagraph.GraphedBlocks.reuse)."""
        return self.current if self.reusing else None


def install(transformer) -> CaptionOnce | None:
    """Give `transformer` a CaptionOnce (idempotent); None where it has no context refiner."""
    from . import cudagraph

    current = installed(transformer)
    if current is not None or not isinstance(getattr(transformer, "context_refiner", None), torch.nn.ModuleList):
        return current
    new_stack = not isinstance(transformer.context_refiner, cudagraph.GraphedBlocks)
    stack = cudagraph.install(transformer, "context_refiner")
    if new_stack:
        stack.enabled = False  # installed for `reuse` only: no graphs of its own
    state = transformer.__dict__["_zimage_caption_once"] = CaptionOnce(transformer)
    stack.reuse = state.reused
    transformer.register_forward_pre_hook(state.before_forward, with_kwargs=True)
    step_graphs = cudagraph.transformer_graphs(transformer)
    if step_graphs is not None:  # a step graph either runs the caption's blocks or reads the buffer
        step_graphs.key_parts.append(lambda: state.reusing)
    return state


def installed(transformer) -> CaptionOnce | None:
    current = getattr(transformer, "__dict__", {}).get("_zimage_caption_once")
    return current if isinstance(current, CaptionOnce) else None


@contextlib.contextmanager
def scope(transformer):
    """One generation's denoise: the caption is refined at its first step and reused at the others."""
    state = installed(transformer)
    if state is None:
        yield
        return
    state.active, state._last = True, ()
    try:
        yield
    finally:
        state.active, state.reusing, state._last = False, False, ()
