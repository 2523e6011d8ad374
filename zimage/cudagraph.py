"""The 30 main transformer blocks of ZImageTransformer2DModel replayed as one CUDA graph per input shape.

Why: with torchao's fp8 weights (tensor subclasses, replaced since by zimage/fp8.py) the host could not issue
the compiled blocks' kernels as fast as the GPU ran them: the H100 profile of 2026-11-24 showed the GPU busy
only 58 % of the denoise window. A CUDA graph replays every kernel of the 30 blocks with one launch, so
Python and Dynamo's guards run once at capture instead of on every step. Off by default (bf16: no gain).

How: `install` swaps `transformer.layers` for a `GraphedBlocks` -- the same ModuleList (same modules, same
state-dict keys, so LoRA loading and compile_repeated_blocks see nothing different) whose iteration, during
inference on CUDA, yields one runner in place of the 30 blocks. diffusers' forward loop
(`for layer_idx, layer in enumerate(self.layers)`) then calls the runner once with the blocks' arguments.
The runner keys graphs by the input shapes (batch, sequence = image tokens + caption padded to 32, dim):
a Standard request and a 16-token-longer prompt share a graph when the caption rounds to the same 32.

First call of a key: one eager (compiled) pass on a side stream -- compiles/loads kernels, as CUDA graph
capture allows no compilation -- then capture into a memory pool shared by all graphs (graphs never run at
the same time; each one's static inputs/outputs stay, intermediates are reused). Later calls copy the inputs
into the static buffers, replay, and return a copy of the output. Anything the graph cannot express falls back
to the plain loop: an attention mask (batched prompts of different lengths), grad mode, CPU, or a capture
that failed (logged once; graphs then stay off). Not for ControlNet pipelines: diffusers adds their block
samples between blocks by index, which a single runner does not see (the engine runs none).

`GraphedTextEncoder` does the same for the text encoder (Qwen3, 36 compiled layers): one graph per bucket
length (stages.ENCODE_BUCKET), because the compiled encoder is host-bound on the H100 (31 ms where its
kernels need ~5 ms, 2026-11-24). `GraphedTransformer` replays a whole denoising step, `GraphedDecode` the untiled
VAE decode (in the step graphs' pool).
"""

from __future__ import annotations

import collections
import logging

import torch

log = logging.getLogger("zimage.cudagraph")

MAX_GRAPHS = 24  # shapes kept; least recently used dropped beyond it (each holds only its static I/O)
_captures_total = 0  # every capture of every graph set in this process (captures_total)


class _Graph:
    __slots__ = ("graph", "inputs", "output")

    def __init__(self, graph, inputs, output):
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphedBlocks(torch.nn.ModuleList):
    """`transformer.layers` with CUDA-graph replay of the whole stack (see the module docstring)."""

    def __init__(self, layers: torch.nn.ModuleList, max_graphs: int = MAX_GRAPHS):
        super().__init__(list(layers))
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.max_graphs = max_graphs
        self.enabled = True  # CUDA graphs (switch block_graphs)
        self.kernels = None  # a fastblocks.Schedule: the blocks on hand-scheduled kernels (switch block_kernels)
        self.captures = 0
        self.replays = 0
        self._pool = None
        self._runner_active = False
        # More parts of a graph's key, besides the input shapes: Python state the captured kernels depend on
        # (lora.py adds whether the LoRA branch runs).
        self.key_parts: list = []
        # The stack's output computed earlier, or None (caption_once.CaptionOnce.reused: the caption refiner's
        # output is the same at every step of a generation).
        self.reuse = None

    # diffusers iterates the blocks; during graphed inference it gets a single runner instead.
    def __iter__(self):
        stored = self.reuse() if self.reuse is not None else None
        if stored is not None:
            return iter([lambda x, *args: stored if x.shape == stored.shape else self._loop(x, *args)])
        if self._use_runner():
            return iter([self._run])
        return super().__iter__()

    def _use_runner(self) -> bool:
        if self._runner_active or not _runner_allowed():
            return False
        # Inside another capture (GraphedTransformer) the kernels still run; graphs of their own do not nest.
        return self.kernels is not None or (self.enabled and not torch.cuda.is_current_stream_capturing())

    def _loop(self, x, mask, freqs, adaln=None, noise_mask=None, t_noisy=None, t_clean=None):
        if self.kernels is not None and mask is None and noise_mask is None:
            out = self.kernels.run(list(super().__iter__()), x, freqs, adaln)
            if out is not None:
                return out
        for block in super().__iter__():
            x = block(x, mask, freqs, adaln, noise_mask, t_noisy, t_clean)
        return x

    def _run(self, x, mask, freqs, adaln=None, noise_mask=None, t_noisy=None, t_clean=None):
        if (not self.enabled or torch.cuda.is_current_stream_capturing() or mask is not None or noise_mask is not None
                or adaln is None or not x.is_cuda):
            return self._loop(x, mask, freqs, adaln, noise_mask, t_noisy, t_clean)
        key = (tuple(x.shape), x.dtype, tuple(freqs.shape), freqs.dtype, tuple(adaln.shape), adaln.dtype, x.device,
               *(part() for part in self.key_parts))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, x, freqs, adaln)
            if entry is None:
                return self._loop(x, mask, freqs, adaln)
        else:
            self.graphs.move_to_end(key)
        for static, value in zip(entry.inputs, (x, freqs, adaln)):
            static.copy_(value)
        entry.graph.replay()
        self.replays += 1
        return entry.output.clone()

    def _capture(self, key, x, freqs, adaln):
        self._runner_active = True
        try:
            inputs = (x.clone(), freqs.clone(), adaln.clone())
            graph, output = capture(lambda: self._loop(inputs[0], None, inputs[1], inputs[2]), x.device,
                                    shared_pool(self))
        except Exception as exc:  # noqa: BLE001 - graphs are an optimisation; the plain loop always works
            self.enabled = False
            log.warning("CUDA graph capture of the transformer blocks failed (%s); running them without graphs",
                        _describe(exc))
            return None
        finally:
            self._runner_active = False
        entry = remember(self, key, _Graph(graph, inputs, output))
        log.info("captured a CUDA graph of %d transformer blocks for %s", len(self), key[0])
        return entry

    def clear(self) -> None:
        """Drop every graph (their pool memory is freed once no graph refers to it)."""
        self.graphs.clear()
        self._pool = None


def remember(graphs, key, entry: _Graph) -> _Graph:
    """Keep `entry` as the newest graph of a graph set (`graphs`, `captures`, `max_graphs`), dropping the least
    recently used beyond max_graphs."""
    global _captures_total
    graphs.graphs[key] = entry
    graphs.captures += 1
    _captures_total += 1
    while len(graphs.graphs) > graphs.max_graphs:
        graphs.graphs.popitem(last=False)
    return entry


def captures_total() -> int:
    """Graphs captured in this process so far, by every graph set (the engine freezes what a new one left)."""
    return _captures_total


def capture(fn, device, pool):
    """Run `fn` on a side stream first (compiles/loads its kernels and lets lazily created state settle: capture
    allows neither), then capture it into a CUDA graph in `pool`. Returns (graph, fn's output: the graph's static
    output)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):  # the first pass may compile; the second runs what capture will record
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = fn()
    return graph, output


def _describe(exc: BaseException) -> str:
    """An exception and what caused it: a failed capture ends with "operation failed due to a previous error during
    capture" from the capture's end, which hides the error that broke it (its __context__)."""
    parts = []
    while exc is not None and len(parts) < 3:
        parts.append(str(exc).splitlines()[0][:300] if str(exc) else repr(exc))
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)


def _runner_allowed() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (not torch.is_grad_enabled() and torch.cuda.is_available() and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)  # e.g. a FlopCounterMode must see the real ops


def _graphs_allowed() -> bool:
    return _runner_allowed() and not torch.cuda.is_current_stream_capturing()


class GraphedTextEncoder:
    """The text encoder's forward, replayed as one CUDA graph per prompt length (installed as the module's
    `forward`, so the pipeline's `text_encoder(input_ids=..., attention_mask=..., output_hidden_states=True)`
    call is unchanged).

    What the graph computes: the hidden states at `keep` (diffusers' ZImagePipeline reads the penultimate
    layer's, `hidden_states[-2]`); the output's other hidden states and `last_hidden_state` are None, so a caller
    wanting them fails loudly instead of reading another request's data. The attention mask is dropped: the
    encoder is causal and the tokenizer pads after the prompt, so the prompt's rows cannot see the padding and
    come out the same without a mask (the padding rows differ; the pipeline discards them). A mask that is not
    right-padding (ones, then zeros), a batch of several prompts, any other argument, grad mode or a CPU input
    runs the original forward."""

    def __init__(self, text_encoder: torch.nn.Module, keep: tuple[int, ...] = (-2,), max_graphs: int = 16):
        self.module = text_encoder
        self.original = text_encoder.forward
        self.keep, self.max_graphs = keep, max_graphs
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.enabled = True
        self.captures = self.replays = 0
        self._pool = None
        # "No mask" as transformers' per-layer-type mask mapping, so it builds none: left to itself it skips the
        # mask only when it may read the mask's contents, which it never does while a CUDA graph is being captured
        # -- capture would then run the layers with a mask tensor the warm-up passes never saw (a recompile inside
        # the capture: "operation not permitted when stream is capturing", H100 2026-11-24). Causal attention
        # without a mask is SDPA's is_causal path. Encoders with sliding-window layers are not graphed (None).
        layer_types = set(getattr(text_encoder.config, "layer_types", None) or ["full_attention"])
        self._no_mask = {"full_attention": None} if layer_types == {"full_attention"} else None

    def __call__(self, input_ids=None, attention_mask=None, output_hidden_states=None, **kwargs):
        if (not self.enabled or kwargs or not output_hidden_states or input_ids is None or input_ids.shape[0] != 1
                or not input_ids.is_cuda or not _graphs_allowed() or not _right_padded(attention_mask)
                or self._no_mask is None):
            return self.original(input_ids=input_ids, attention_mask=attention_mask,
                                 output_hidden_states=output_hidden_states, **kwargs)
        key = (tuple(input_ids.shape), input_ids.dtype, input_ids.device)
        entry = self.graphs.get(key) or self._capture(key, input_ids)
        if entry is None:
            return self.original(input_ids=input_ids, attention_mask=attention_mask,
                                 output_hidden_states=output_hidden_states, **kwargs)
        self.graphs.move_to_end(key)
        entry.inputs[0].copy_(input_ids)
        entry.graph.replay()
        self.replays += 1
        return _hidden_states_output(entry.output, self.keep, self.module)

    def _capture(self, key, input_ids):
        static_ids = input_ids.clone()

        def run():
            hidden = self.original(input_ids=static_ids, attention_mask=self._no_mask,
                                   output_hidden_states=True).hidden_states
            return [hidden[i] for i in self.keep]

        try:
            graph, output = capture(run, input_ids.device, shared_pool(self))
        except Exception as exc:  # noqa: BLE001 - graphs are an optimisation; the plain forward always works
            self.enabled = False
            log.warning("CUDA graph capture of the text encoder failed (%s); running it without graphs",
                        _describe(exc))
            return None
        entry = remember(self, key, _Graph(graph, (static_ids,), output))
        log.info("captured a CUDA graph of the text encoder for %d tokens", key[0][1])
        return entry

    def clear(self) -> None:
        """Drop every graph: the encoder's weights are moving (a captured graph reads them at fixed addresses)."""
        self.graphs.clear()
        self._pool = None


class GraphedTransformer:
    """The transformer's whole forward (one denoising step: embedders, refiners, the 30 blocks, final layer) replayed
    as one CUDA graph per input shape; installed as the module's `forward`, so the pipeline's call is unchanged.

    Why: with the blocks on hand-scheduled kernels (fastblocks.py) the fp8 step's kernels take 65.7 ms on the H100
    but the step took 69.3 ms (2026-11-25): the GPU waited ~3 ms a step for the host to issue the step's ~200 small
    kernels around the blocks (patchify, embedders, RoPE table, refiners, unpatchify) -- no synchronisation in the
    step (bench/latency.py --sync-debug), just launches. A graph issues them all at once.

    A shape is captured on its second call (the warm-up's two steps), so a one-off shape never pays for a capture.
    The key is every input's shape and dtype, plus `key_parts` (lora.py adds whether the LoRA branch runs). Anything
    else runs the original forward: ControlNet samples, SigLIP/omni inputs, attention kwargs, grad mode, CPU tensors,
    or a capture that failed (logged once; graphs then stay off). Static outputs are cloned on return."""

    def __init__(self, transformer: torch.nn.Module, max_graphs: int = MAX_GRAPHS):
        self.module = transformer
        self.original = transformer.forward
        self.max_graphs = max_graphs
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.seen: dict = {}
        self.enabled = True
        self.captures = self.replays = 0
        self.key_parts: list = []
        self._pool = None

    def __call__(self, x, t, cap_feats, return_dict: bool = True, controlnet_block_samples=None, siglip_feats=None,
                 image_noise_mask=None, patch_size: int = 2, f_patch_size: int = 1, joint_attention_kwargs=None):
        plain = (not self.enabled or controlnet_block_samples is not None or siglip_feats is not None
                 or image_noise_mask is not None or joint_attention_kwargs or not isinstance(x, list | tuple)
                 or not x or not all(isinstance(v, torch.Tensor) and v.is_cuda for v in (*x, t, *cap_feats))
                 or not _graphs_allowed())
        key = None if plain else (
            tuple((tuple(v.shape), v.dtype) for v in x), tuple(t.shape), t.dtype,
            tuple((tuple(c.shape), c.dtype) for c in cap_feats), x[0].device, patch_size, f_patch_size,
            *(part() for part in self.key_parts))
        entry = None if key is None else self.graphs.get(key)
        if entry is None and key is not None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] >= 2:
                entry = self._capture(key, list(x), t, list(cap_feats), patch_size, f_patch_size)
        if entry is None:
            return self.original(x, t, cap_feats, return_dict=return_dict,
                                 controlnet_block_samples=controlnet_block_samples, siglip_feats=siglip_feats,
                                 image_noise_mask=image_noise_mask, patch_size=patch_size, f_patch_size=f_patch_size,
                                 joint_attention_kwargs=joint_attention_kwargs)
        self.graphs.move_to_end(key)
        for static, value in zip(entry.inputs, (*x, t, *cap_feats), strict=True):
            static.copy_(value)
        entry.graph.replay()
        self.replays += 1
        out = [o.clone() for o in entry.output]
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)

    def _capture(self, key, x, t, cap_feats, patch_size, f_patch_size):
        inputs = tuple(v.clone() for v in (*x, t, *cap_feats))
        n = len(x)

        def run():
            return list(self.original(list(inputs[:n]), inputs[n], list(inputs[n + 1:]), return_dict=False,
                                      patch_size=patch_size, f_patch_size=f_patch_size)[0])

        try:
            graph, output = capture(run, x[0].device, shared_pool(self))
        except Exception as exc:  # noqa: BLE001 - graphs are an optimisation; the plain forward always works
            self.enabled = False
            log.warning("CUDA graph capture of the transformer failed (%s); running it without graphs",
                        _describe(exc))
            return None
        entry = remember(self, key, _Graph(graph, inputs, output))
        log.info("captured a CUDA graph of the transformer for %s", key[0])
        return entry

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self._pool = None


class GraphedDecode:
    """The untiled VAE decode -- latents scaled, the compiled decoder, the finiteness check and the conversion to uint8
    pixels (stages.decode_to_pixels) -- replayed as one CUDA graph per latent shape.

    Why: the compiled decoder is host-bound (H200 2026-12-02, Standard fp8: 37.6 ms wall for 30 ms of kernels, 1.4 ms
    of it Dynamo's guard check before the first kernel), and its multi-GB transient was handed back to the driver by
    the per-request cache release and mapped again by the next decode (7.3 ms of release a request). In a graph the
    kernels go out in one launch, and the transient lives in the graph pool, shared with the step graphs
    (GraphedTransformer: never running at the same time), so it is neither released nor mapped again.

    Captured on a shape's first call (the warm-up decodes each tier once). A capture runs the decode eagerly first,
    so it needs room for two decodes' transients: the engine installs decode graphs only where the card has it
    (memory.room_for_decode_graphs), and `room(latents)` checks again before each capture (else that call decodes
    eagerly, and a later one may capture). Not for tiled decodes (the stage decodes those eagerly), a batch, CPU
    tensors, grad mode, or after a capture failed (logged once; the stage then decodes eagerly): memory a failed
    capture mapped stays in the shared pool, so after an out-of-memory capture no further one is tried. Returns the
    static outputs: the caller copies the pixels to the host before the next decode (the engine's GPU lock serialises
    decodes)."""

    def __init__(self, vae: torch.nn.Module, decode_fn, pool=None, room=None, max_graphs: int = MAX_GRAPHS):
        self.vae, self.decode_fn, self.room = vae, decode_fn, room
        self.max_graphs = max_graphs
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.enabled = True
        self.captures = self.replays = 0
        self._pool = pool

    def __call__(self, latents: torch.Tensor):
        """(pixels (H, W, 3) uint8, all-finite flag) on the GPU, or None where no graph applies."""
        if not self.enabled or latents.dim() != 4 or latents.shape[0] != 1 or not latents.is_cuda \
                or not _graphs_allowed():
            return None
        key = (tuple(latents.shape), latents.dtype, tuple(latents.stride()), latents.device)
        entry = self.graphs.get(key)
        if entry is None:
            if self.room is not None and not self.room(latents):
                return None
            entry = self._capture(key, latents)
            if entry is None:
                return None
        self.graphs.move_to_end(key)
        entry.inputs[0].copy_(latents)
        entry.graph.replay()
        self.replays += 1
        return entry.output

    def _capture(self, key, latents):
        static = latents.clone()
        try:
            graph, output = capture(lambda: self.decode_fn(self.vae, static), latents.device, shared_pool(self))
        except torch.OutOfMemoryError:
            self.enabled = False
            log.warning("out of memory capturing a CUDA graph of the VAE decode for latents %s; decoding without "
                        "graphs", key[0])
            return None
        except Exception as exc:  # noqa: BLE001 - graphs are an optimisation; the eager decode always works
            self.enabled = False
            log.warning("CUDA graph capture of the VAE decode failed (%s); decoding without graphs", _describe(exc))
            return None
        entry = remember(self, key, _Graph(graph, (static,), output))
        log.info("captured a CUDA graph of the VAE decode for latents %s", key[0])
        return entry

    def clear(self) -> None:
        self.graphs.clear()
        self._pool = None


def install_decode(vae, decode_fn, pool=None, room=None) -> GraphedDecode:
    """Give `vae` a GraphedDecode of `decode_fn(vae, latents)` (idempotent); `pool`: a graph pool to share; `room`:
    see GraphedDecode."""
    current = decode_graphs(vae)
    if current is None:
        current = vae.__dict__["_zimage_graphed_decode"] = GraphedDecode(vae, decode_fn, pool, room)
    return current


def decode_graphs(vae) -> GraphedDecode | None:
    current = vae.__dict__.get("_zimage_graphed_decode") if vae is not None else None
    return current if isinstance(current, GraphedDecode) else None


def shared_pool(graphs) -> object:
    """The graph pool of a graph set (created now if it has none yet): where its captures allocate, and what another
    set that never runs at the same time may share, so that their intermediates take the same memory."""
    if graphs._pool is None:
        graphs._pool = torch.cuda.graph_pool_handle()
    return graphs._pool


def install_transformer(transformer) -> GraphedTransformer:
    """Route `transformer`'s forward through a GraphedTransformer (idempotent)."""
    return _install_forward(transformer, GraphedTransformer)


def transformer_graphs(transformer) -> GraphedTransformer | None:
    return _installed_forward(transformer, GraphedTransformer)


def _install_forward(module, graphed_class):
    """Set an instance `forward` that replays graphs of the module's own forward (idempotent)."""
    current = _installed_forward(module, graphed_class)
    if current is None:
        current = module.forward = graphed_class(module)
    return current


def _installed_forward(module, graphed_class):
    current = module.__dict__.get("forward") if module is not None else None
    return current if isinstance(current, graphed_class) else None


def _right_padded(mask) -> bool:
    """True for no mask, or a (1, L) mask of ones then zeros. One small device->host read."""
    if mask is None:
        return True
    if mask.dim() != 2 or mask.shape[0] != 1:
        return False
    m = mask[0].to(torch.int8)
    return not bool((m[1:] > m[:-1]).any())


def _hidden_states_output(kept, keep, module):
    from transformers.modeling_outputs import BaseModelOutputWithPast

    n = module.config.num_hidden_layers + 1  # embeddings + every layer, as transformers returns them
    hidden = [None] * n
    for index, tensor in zip(keep, kept):
        hidden[index] = tensor.clone()  # the static output is overwritten by the next replay
    return BaseModelOutputWithPast(last_hidden_state=None, hidden_states=tuple(hidden))


def install_text_encoder(text_encoder) -> GraphedTextEncoder:
    """Route `text_encoder`'s forward through a GraphedTextEncoder (idempotent)."""
    return _install_forward(text_encoder, GraphedTextEncoder)


def text_encoder_graphs(text_encoder) -> GraphedTextEncoder | None:
    return _installed_forward(text_encoder, GraphedTextEncoder)


# The transformer's block stacks, each a ModuleList its forward iterates: the main blocks and the two refiners.
STACKS = ("layers", "noise_refiner", "context_refiner")


def install(transformer, name: str = "layers") -> GraphedBlocks:
    """Replace the stack `transformer.<name>` by a GraphedBlocks over the same modules (idempotent). A new one runs
    graphs (`enabled`) and no kernels; the caller sets both."""
    layers = getattr(transformer, name)
    if isinstance(layers, GraphedBlocks):
        return layers
    graphed = GraphedBlocks(layers)
    setattr(transformer, name, graphed)
    return graphed


def uninstall(transformer) -> None:
    for name in STACKS:
        layers = getattr(transformer, name, None)
        if isinstance(layers, GraphedBlocks):
            layers.clear()
            setattr(transformer, name, torch.nn.ModuleList(list(super(GraphedBlocks, layers).__iter__())))


def block_stacks(transformer) -> list[GraphedBlocks]:
    """The installed GraphedBlocks among the transformer's stacks."""
    return [s for s in (getattr(transformer, name, None) for name in STACKS) if isinstance(s, GraphedBlocks)]
