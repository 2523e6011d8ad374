"""Speed switches applied to a placed pipeline: attention backend, fp8 weights, regional compile.

Order matters: quantize to fp8 *before* compiling (quantizing a compiled model took 391 s to first image
and produced NaN pixels on the H100; docs/PERFORMANCE.md).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os

import torch

log = logging.getLogger("zimage.speed")

# Layers whose precision the image depends on most: timestep/caption/patch embedders, the final
# projection, and the adaLN modulation. They stay bf16 under fp8 (vllm-omni does the same).
FP8_EXCLUDED = ("t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer", "adaLN")


@dataclasses.dataclass(frozen=True)
class Switches:
    """Speed switches beyond the Settings flags, each measured in docs/PERFORMANCE.md (2026-11-24 and -25).

    real_rope   project attention processor with real-valued RoPE (fastattn.py); any device
    vae_compile channels-last VAE + torch.compile(vae.decoder) when compiling (CUDA); tiled decode stays eager
    block_graphs the 30 main transformer blocks replayed as one CUDA graph per shape (cudagraph.py); CUDA,
                `full` memory profile, compiled transformer
    encoder_graphs the text encoder replayed as one CUDA graph per prompt bucket (cudagraph.GraphedTextEncoder);
                CUDA, compiled encoder resident on the GPU (full, and 16gb with fp8)
    precompile  Dynamo's precompile cache (torch's experimental `caching_precompile`) in --cache-dir, per
                compile-cache key (compile_cache.py): a restart loads the traced graphs and their guards instead
                of re-tracing the Python code (the 36.5 s left of an fp8 restart, H100 2026-11-24). Process-wide
                torch state, so the CPU test suite turns it off (tests/conftest.py) and tests it in subprocesses.
    fused_kernels  the fp8 SwiGLU and the quantization of its output as one Triton kernel (kernels.py; the PyTorch
                reference where Triton is absent); with fused_projections
    vae_split_norm  the compiled decoder's GroupNorms with two-step statistics (groupnorm.py); with vae_compile
    vae_gemm_attention  the decoder's mid-block attention (one head of 512, which flash/cuDNN SDPA cannot take) as
                two GEMMs and a float32 softmax (vae_attention.py) instead of SDPA's memory-efficient kernel; with
                vae_compile. On: decode 30.9 -> 28.9 ms (fp8) and 30.2 -> 28.0 ms (bf16), Standard, H100 2026-12-07
                (the kernel alone 4.5 -> 2.4 ms)
    fused_projections  q/k/v and w1/w3 as one GEMM each over a shared weight (fusion.py); a transformer that
                stays resident (not the streamed 12gb profile)
    block_kernels  the main blocks and both refiners scheduled by hand on Triton kernels + the GEMMs, without
                Inductor (fastblocks.py); CUDA with Triton, fused projections; any memory profile whose transformer
                stays resident
    step_graphs the transformer's whole forward (one step) replayed as one CUDA graph per shape
                (cudagraph.GraphedTransformer); CUDA, `full` memory profile, compiled
    decode_graphs  the untiled VAE decode (compiled decoder + pixel conversion) replayed as one CUDA graph per latent
                shape (cudagraph.GraphedDecode), its transient in the step graphs' pool; with vae_compile
    fp8_attention  the blocks' attention on 8-bit operands (int8 QK^T, e4m3 PV; fp8_attention.py, a Triton kernel)
                instead of bf16 SDPA/FA4; with block_kernels, fp8 or bf16 weights alike. Off: slower than cuDNN's bf16
                attention on the H100 (2026-12-07: fp8 0.5785 -> 0.6096 s, bf16 0.8185 -> 0.8357 s in one engine)
    overlap_stages  the stages (text encode, denoise, decode) queued without a host wait between them, timed by CUDA
                events, the pixels copied back once at the end (stages.StageClock); the text encoder's padding cut
                by a length the host knows instead of a device-side mask index (stages.encode_prompt). On: -2.9 to
                -6.1 ms a Standard generation (H100, 2026-12-07, one engine each, runs alternating)
    fused_gemms the q/k norm + RoPE in the q/k/v GEMM's epilogue and (bf16) the SwiGLU in the w1/w3 GEMM's
                (fused_gemm.py, Triton GEMMs on TMA); with block_kernels, a GPU of compute capability >= 9.0. On, for
                the SwiGLU GEMM only (fused_gemm.USE): bf16 97.0 -> 96.3 ms/step, bit-identical latents; the q/k/v
                ones lost end to end (H100, Triton 3.6, 2026-12-07: both on, fp8 0.591 -> 0.621 s, bf16 0.817 ->
                0.841 s in one engine; Triton's plain GEMM 17 % under cuBLAS's). fp8 runs no fused GEMM
    lt_gemms    the blocks' GEMMs on cuBLASLt with the algorithm picked by timing the heuristic's candidates on a shape's
                first call (lt_gemm.py; nvmath-python); with block_kernels, compute capability >= 9.0
    cudnn_fp8_attention  the fp8 blocks' attention on cuDNN's 8-bit flash attention, its operands quantized inside
                the q/k norm + RoPE kernel and its e4m3 output read by to_out's GEMM directly (cudnn_attention.py;
                nvidia-cudnn-frontend); with block_kernels, fp8 weights, compute capability >= 9.0
    caption_once the caption refiner (two unmodulated blocks over the prompt's tokens) run once per generation, its
                output reused at the other steps (caption_once.py); any device, a transformer that stays resident
    2026-11-25, second session (fp8, Standard): block_kernels on (74.7 -> 70.7 ms/step in one engine), step_graphs
    on (0.627 -> 0.611 s in one engine; GPU idle 3.2 -> 1.5 ms/step).
    Defaults (measured, H100 2026-11-24, bf16): real_rope on (-3.2 ms/step), vae_compile on (decode 108 -> 45 ms),
    block_graphs off (bf16 0.916 vs 0.914 s with the graphs off in the same engine: kernel-bound; fp8 2026-11-25:
    0.648 s alone, 0.640 s with fused_kernels, restart not measured). 2026-11-25, fp8: vae_split_norm on (decode
    58 -> 35 ms), fused_projections on (74.9 -> 74.7 ms/step, fewer launches, memory-neutral), fused_kernels off.
    Defaults come from DEFAULT_SWITCHES; ZIMAGE_SPEED="-real_rope,+block_graphs" (comma-separated, + or - before a
    name) overrides them for a process (benchmarks and experiments)."""

    real_rope: bool = True
    vae_compile: bool = True
    block_graphs: bool = False
    encoder_graphs: bool = True  # predicted: text encode 31 -> <= 10 ms (host-bound; its kernels need ~5 ms)
    vae_split_norm: bool = True  # predicted decode 51 -> <= 38 ms; measured 58 -> 35 ms (H100 2026-11-25)
    # Off: the kernel saves 7 ms of GPU time a generation, but calling it through Python between the compiled
    # kernels idled the GPU as long (H100 2026-11-25: 74.3 ms/step with and without); for block_graphs experiments.
    fused_kernels: bool = False
    fused_projections: bool = True  # predicted fp8 -1.5 ms/step; measured -0.2 (GEMMs already at the fp8 floor)
    # predicted (H100, Standard, fp8): the block's norm/RoPE/quantization kernels 14 -> ~7 ms/step; measured 14.1 -> 8.8
    block_kernels: bool = True
    # predicted fp8: the ~3 ms/step the GPU waits for the host's launches -> ~0; measured idle 3.2 -> 1.5 ms/step
    step_graphs: bool = True
    # predicted (H200, Standard fp8): decode 37.6 -> ~31 ms (its kernels: 30 ms) and the per-request release
    # 7.3 -> ~1 ms (the decoder's transient stays in the graph pool instead of being unmapped and mapped again)
    decode_graphs: bool = True
    # Off until measured on a GPU (written 2026-12-07 without device time; CPU: Triton's interpreter). Predicted
    # (H200, Standard, fp8 and bf16): attention 16.3 -> ~10.9 ms/step at ~1.5x cuDNN's bf16 rate, quantization and
    # k's mean ~1.4 ms/step extra: ~-31 ms a generation; quality: latents' rel-L2 (bench/latency.py --ab fa8).
    fp8_attention: bool = False
    # Off until measured on a GPU (written 2026-12-07, fourth session; CPU: Triton's interpreter). Predicted (H100,
    # Standard): bf16 -~37 ms a generation if the Triton GEMMs run at cuBLAS's rate (the SwiGLU kernel's 89 µs and
    # the q/k kernel's 49 µs a block gone; break-even at ~9 % slower GEMMs); fp8 the q/k kernel only, ~-13 ms.
    fused_gemms: bool = True
    # Predicted (H100, Standard): the decoder's attention 4.6 -> ~2-2.6 ms of the 35 ms decode (bench/attention.py
    # --vae); measured (2026-12-07, sixth session, two engines each): decode -1.9 ms fp8, -2.2 ms bf16.
    vae_gemm_attention: bool = True
    # Predicted (H100, Standard): -3 to -6 ms a generation, fp8 and bf16 alike: the ~13 ms of host-only time around
    # the stages (2026-12-07 profile: text encode 4.3, denoise 2.7, decode 4.5 ms of wall beyond the GPU's busy time)
    # partly hidden behind the previous stage's kernels. Measured (one engine, runs alternating): -2.9 to -4.8 ms
    # fp8, -3.4 to -6.1 ms bf16.
    overlap_stages: bool = True
    # Predicted (H100, Standard): -2 to -3.5 ms a generation (the caption refiner's two blocks over 256 tokens at 7 of
    # the 8 steps). Measured (2026-12-07, one engine, runs alternating): fp8 +1.0 ms, bf16 -1.1 ms, within the noise
    # (their weights' bytes say ~-0.8 / -1.6 ms); latents bit-identical. On: exact, and 7 of 8 refiner runs fewer.
    caption_once: bool = True
    # Off until measured end to end. Predicted (H100, Standard): bf16 -0.6 ms a step (the q/k/v GEMM 503.9 -> 484.6
    # us in bench/gemm_algos.py; w1/w3 runs fused_gemms' Triton GEMM); fp8: what bench/gemm_algos.py finds.
    lt_gemms: bool = False
    # Off until measured on a GPU (written 2026-12-08 without device time; CPU: Triton's interpreter and a PyTorch
    # reference for cuDNN's kernel). Predicted (H100, Standard fp8): ~-100 us a block (cuDNN's fp8 kernel 428 -> 309
    # us, quantize_heads gone, +v's amax and quantization) ~ -25 ms a generation; latents' rel-L2 ~0.02 (--ab c8).
    cudnn_fp8_attention: bool = False
    precompile: bool = True  # predicted: fp8 restart 66.8 -> <= 40 s (CPU tiny: first warm-up shape 6.2 -> 0.9 s)

    @classmethod
    def parse(cls, spec: str, base: "Switches | None" = None) -> "Switches":
        values = dataclasses.asdict(base or cls())
        for token in filter(None, (t.strip() for t in spec.split(","))):
            on = not token.startswith("-")
            name = token.lstrip("+-")
            if name not in values:
                raise ValueError(f"unknown speed switch {name!r} in ZIMAGE_SPEED; known: {', '.join(values)}")
            values[name] = on
        return cls(**values)


DEFAULT_SWITCHES = Switches()


def switches() -> Switches:
    return Switches.parse(os.environ.get("ZIMAGE_SPEED", ""), DEFAULT_SWITCHES)


def flash_attn_2_available() -> bool:
    """FlashAttention-2 (diffusers backend "flash") is installed: its interface module, not just a `flash_attn`
    namespace (flash-attn-4 installs `flash_attn.cute` only, and picking "flash" then failed at first use)."""
    try:
        return (importlib.util.find_spec("flash_attn") is not None
                and importlib.util.find_spec("flash_attn.flash_attn_interface") is not None)
    except (ImportError, ValueError):  # a namespace without __init__, or a broken install
        return False


def flash_attn_3_available() -> bool:
    try:
        return importlib.util.find_spec("flash_attn_interface") is not None  # FlashAttention 3 (Hopper) wheel
    except (ImportError, ValueError):
        return False


def available_attention_backends(device: str) -> list[str]:
    """Backends `auto` chooses from, first = chosen, by the H100 measurements in docs/PERFORMANCE.md.

    On Hopper and Blackwell: FlashAttention-4 (`fa4`, the project's processor) when flash-attn-4 is installed --
    measured in the engine on the H100 (2026-11-25, Standard 1024^2): fp8 0.647 -> 0.639 s, bf16 0.866 -> 0.860 s
    against cuDNN; then FA3 when its wheel is installed (not measured), then SDPA `native`, which picks cuDNN there
    (and, with the project's real-RoPE processor, gets q/k in the layout cuDNN reads without copies).
    FlashAttention-2 is *slower* than SDPA's cuDNN kernel on an H100 (0.82 vs 0.44 ms per block), so it is only
    offered below sm90, and only when FA2 itself is installed (not just a `flash_attn` namespace)."""
    from . import fastattn

    if not device.startswith("cuda"):
        return ["native"]
    names = []
    major = torch.cuda.get_device_capability(torch.device(device))[0] if torch.cuda.is_available() else 0
    if major in (9, 10) and fastattn.fa4_importable():
        names.append(fastattn.FA4)
    if major >= 9 and flash_attn_3_available():
        names.append("_flash_3")
    if major < 9 and flash_attn_2_available():
        names.append("flash")
    names += ["native", "_native_cudnn", "_native_flash", "_native_efficient"]
    return names


def choose_attention_backend(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    return available_attention_backends(device)[0]


def apply_attention_backend(transformer, backend: str, real_rope: bool | None = None) -> None:
    """Set the attention backend; with real-valued RoPE (default on, see fastattn.py) the project's processor
    is installed first. `fa4` needs that processor (it is where the BSHD FlashAttention-4 call lives)."""
    from . import fastattn

    if real_rope is None:
        real_rope = switches().real_rope
    if backend == fastattn.FA4 and not fastattn.fa4_importable():
        raise RuntimeError("--attention fa4 needs flash-attn-4 (pip install flash-attn-4); use --attention auto")
    if real_rope or backend == fastattn.FA4:
        fastattn.install(transformer, use_fa4=backend == fastattn.FA4)
    if backend in ("native", fastattn.FA4):
        return  # diffusers' default; set_attention_backend would only log an 'experimental' warning
    transformer.set_attention_backend(backend)


def fuse_projections(transformer, resident: bool, sw: Switches | None = None) -> int:
    """q/k/v and w1/w3 as one GEMM each (fusion.py), where the switch is on and the transformer stays resident
    (the fused weights are views that a streamed model's moves would break). Returns the groups fused."""
    from . import fusion

    sw = sw or switches()
    if not sw.fused_projections or not resident:
        return 0
    return fusion.install(transformer, swiglu_kernel=sw.fused_kernels)


def fp8_supported(device: str) -> bool:
    """Rowwise-scaled fp8 GEMMs (`torch._scaled_mm`) need compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def fp8_wanted(setting: str, device: str, dtype: torch.dtype) -> bool:
    """auto: on where supported and the weights are bf16 (the fp8 path is measured and bounded for bf16 only)."""
    if setting == "off":
        return False
    if dtype != torch.bfloat16:
        if setting == "on":
            raise RuntimeError("--fp8 on needs --dtype bf16 (fp8 replaces bf16 weights; its error bound is stated for bf16); "
                               "use --dtype bf16, or --fp8 off or auto")
        return False
    supported = fp8_supported(device)
    if setting == "on" and not supported:
        raise RuntimeError("--fp8 on needs a CUDA GPU with compute capability >= 8.9; "
                           "use --fp8 auto or off")
    return supported


def quantize_fp8(module: torch.nn.Module, excluded: tuple[str, ...] = FP8_EXCLUDED, device: str | None = None,
                 home: str | None = None) -> int:
    """fp8 rowwise (dynamic activation + weight) on every Linear except `excluded`; returns how many (fp8.py).

    With `device`, each Linear moves there just before it is quantized and the rest follows at the end, so
    peak memory is the fp8 model plus one bf16 layer (a 12 GiB card never holds the 11.5 GiB bf16 copy)."""
    from . import fp8

    return fp8.quantize_module(module, excluded, device, home)


def use_compile_cache(folder) -> None:
    """Persist Inductor's compiled kernels and FX graphs, so a restart recompiles from cache (seconds,
    not minutes), and the hand-written Triton kernels' binaries (kernels.py, fp8_attention.py, fused_gemm.py) beside them. Folders
    the user set through TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR are kept."""
    import os
    from pathlib import Path

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    # Triton's own cache is ~/.triton/cache otherwise: a restart in a fresh container (the cache folder mounted, the
    # home not) compiled every hand-written kernel again. Inductor's default for GPU 0 is this same folder, so its
    # kernels stay where they were; Triton names binaries by source, options and target, so sharing is safe.
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "triton" / "0"))
    import torch._dynamo

    # Room for a few shapes per compiled region (presets x prompt buckets) before Dynamo gives up on one and
    # silently runs it eager (default limit 8).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Python floats the compiled code reads (module attributes: norm eps, attention scale) as constants. Left
    # symbolic (torch's default), the scalar pass failed on them after the first trace and AOTAutograd run of a
    # region ("Restarting analysis due to ... _tensorify_python_scalars"), and Dynamo traced it again with them
    # specialized: a warm H200 restart spent 11.4 s in first attempts and 4.8 s in second ones (2026-12-02); on the
    # dev CPU a warm restart made 7 AOTAutograd lookups (2 misses) for 5 graphs, and 5 (all hits) with this. None of
    # these floats varies between calls.
    torch._dynamo.config.specialize_float = True


def has_fp8_weights(module: torch.nn.Module) -> bool:
    from . import fp8

    return fp8.has_fp8(module)


def compile_transformer(transformer, dynamic: bool | None = None, mode: str | None = None) -> None:
    """Regional compile: each repeated ZImageTransformerBlock is compiled once and reused (21 s vs minutes).

    Shape-generic up front: the sequence length (image tokens + caption padded to 32) differs per preset and
    prompt, and Dynamo turned the first static graph dynamic at the second length anyway, so every request
    after warm-up ran the dynamic graph; measured on the H100 (2026-11-24, bf16): 98.7 ms/step either way.
    fp8 weights are plain tensors (fp8.py), so fp8 blocks share one graph the same way."""
    if dynamic is None:
        dynamic = True
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=dynamic, mode=mode)


def compile_text_encoder(text_encoder, mode: str | None = None) -> None:
    """Regional compile of the text encoder's decoder layers (the engine pads prompts to 64-token buckets, so
    they see a few lengths; warm-up shows them two). Eager it is launch-bound (58-81 ms where the math needs
    ~5 ms); compiling the whole 36-layer model instead took ~4 minutes on the H100.

    The KV cache is turned off first: with it, transformers hands every layer its own cache-layer object, and
    Dynamo guarded on each one -- 35 recompiles of the same layer (H100 log, 2026-11-24), and every call then
    walked 36 guard sets. The pipeline reads hidden states once; it never needs a cache."""
    if hasattr(text_encoder, "config"):
        text_encoder.config.use_cache = False
    # transformers collects hidden states through forward hooks that read a ContextVar, which Dynamo cannot trace:
    # compiling the layers with their hooks broke each layer into three graphs, every one compiled twice (static,
    # then dynamic) -- 6 traces on every restart. So: install the hooks now, drop the ones on the layers' insides
    # (they record attention maps, which the pipeline never asks for) and compile each layer's `forward` only,
    # leaving the layer's own hidden-state hook outside the compiled code.
    _prepare_output_hooks(text_encoder)
    # dynamic: one trace serves every bucket length; a restart (warm Inductor cache) re-traces once, not once
    # per length seen in warm-up.
    for layer in text_encoder.layers:
        layer.forward = torch.compile(layer.forward, mode=mode, dynamic=True)


def _prepare_output_hooks(text_encoder) -> None:
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # older transformers: hidden states come back without hooks
        return
    maybe_install_capturing_hooks(text_encoder)
    for layer in text_encoder.layers:
        for module in layer.modules():
            if module is layer:
                continue
            for key, hook in list(module._forward_hooks.items()):
                if getattr(hook, "__name__", "") == "output_capturing_hook":
                    del module._forward_hooks[key]


def compile_vae_decoder(vae, split_norm: bool = False, gemm_attention: bool = False) -> None:
    """channels-last VAE and a compiled decoder: GroupNorm and the convolutions' NCHW<->NHWC conversions
    were 57 of the 100 ms eager decode on the H100 (measured 101.7 -> 48.2 ms, 2026-11-24).

    Tiled decode (Ultra, and the engine's OOM fallback) calls the same decoder on tiles of other sizes; it runs
    eagerly (`force_eager`), so tiles never trigger compiles and use no extra compile memory."""
    vae.to(memory_format=torch.channels_last)
    if split_norm:  # GroupNorm statistics Inductor parallelizes (groupnorm.py); eager calls keep aten's kernel
        from . import groupnorm

        groupnorm.install(vae.decoder)
    if gemm_attention:  # the head-512 attention as GEMMs + softmax, opaque to Inductor (vae_attention.py)
        from . import vae_attention

        vae_attention.install(vae)
    # dynamic: one trace for every preset's size (Draft, Standard, High; Ultra decodes tiled, eagerly), so a
    # restart re-traces the decoder once instead of once per size.
    vae.decoder.compile(dynamic=True)
    if getattr(vae, "_zimage_tiled_eager", False):
        return
    tiled_decode = vae.tiled_decode

    def tiled_decode_eager(*args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return tiled_decode(*args, **kwargs)

    vae.tiled_decode = tiled_decode_eager
    vae._zimage_tiled_eager = True


def _fp8_weights(transformer) -> bool:
    from .fp8 import Fp8Linear

    return any(isinstance(m, Fp8Linear) for m in transformer.modules())


def apply_switches(pipe, device: str, compiled: bool, profile: str, sw: Switches | None = None,
                   encoder_compiled: bool = False, fused: bool = False, decode_graph_room: bool = False,
                   streamed: bool = False) -> list[str]:
    """The switches that act after compile was set up (VAE compile, block kernels and graphs, encoder graphs).
    Returns what was applied, for the log and describe(). Real RoPE is applied with the attention backend
    (apply_attention_backend). `encoder_compiled`: the text encoder's layers are compiled and it stays on the GPU
    (not streamed). `fused`: the transformer's projections are fused (fuse_projections). `decode_graph_room`: the
    GPU has room to keep the VAE decode as CUDA graphs (memory.room_for_decode_graphs). `streamed`: the transformer is
    streamed from CPU memory block by block (memory.stream_from_cpu)."""
    from . import cudagraph, cudnn_attention, kernels, lt_gemm

    sw = sw or switches()
    applied = []
    on_gpu = device.startswith("cuda")
    # `full` only: the compiled decoder's peak was 38.6 GiB at 1024^2 vs 21.5 GiB eager (H100, 2026-11-24).
    if sw.vae_compile and compiled and on_gpu and profile == "full":
        compile_vae_decoder(pipe.vae, split_norm=sw.vae_split_norm, gemm_attention=sw.vae_gemm_attention)
        applied.append("vae_compile")
        applied += [name for name in ("vae_split_norm", "vae_gemm_attention") if getattr(sw, name)]
    block_kernels = sw.block_kernels and fused and on_gpu and kernels.available(device)
    block_graphs = sw.block_graphs and compiled and on_gpu and profile == "full"
    if block_kernels:
        from . import fastblocks  # imports diffusers (through fusion): only where the kernels run
    # Kernels: the main blocks and both refiners; graphs of a stack of blocks: the main blocks only.
    for name in cudagraph.STACKS if block_kernels else ("layers",) if block_graphs else ():
        stack = cudagraph.install(pipe.transformer, name)
        stack.enabled = block_graphs and name == "layers"
        stack.kernels = (fastblocks.Schedule(fp8_attention=sw.fp8_attention, fused_gemms=sw.fused_gemms,
                                             lt_gemms=sw.lt_gemms, cudnn_fp8_attention=sw.cudnn_fp8_attention)
                         if block_kernels else None)
    applied += [name for name, on in (("block_kernels", block_kernels), ("block_graphs", block_graphs),
                                      ("fp8_attention", block_kernels and sw.fp8_attention),
                                      ("fused_gemms", block_kernels and sw.fused_gemms),
                                      ("lt_gemms", block_kernels and sw.lt_gemms and lt_gemm.available(device)),
                                      ("cudnn_fp8_attention", block_kernels and sw.cudnn_fp8_attention
                                       and cudnn_attention.available(device) and _fp8_weights(pipe.transformer)))
                if on]
    step_graphs = None
    if sw.step_graphs and compiled and on_gpu and profile == "full":
        step_graphs = cudagraph.install_transformer(pipe.transformer)
        applied.append("step_graphs")
    if sw.decode_graphs and "vae_compile" in applied and decode_graph_room:
        from . import memory
        from .stages import decode_to_pixels

        def room(latents) -> bool:  # the latents are 1/8 of the image per side
            return memory.fits_untiled_decode(device, 8 * latents.shape[-1], 8 * latents.shape[-2], copies=2)

        pool = cudagraph.shared_pool(step_graphs) if step_graphs is not None else None
        cudagraph.install_decode(pipe.vae, decode_to_pixels, pool=pool, room=room)
        applied.append("decode_graphs")
    if sw.encoder_graphs and encoder_compiled and on_gpu:
        cudagraph.install_text_encoder(pipe.text_encoder)
        applied.append("encoder_graphs")
    # After the step graphs (their key says whether the caption is reused). Not for a streamed transformer: its
    # offload hooks learn the blocks' order from the first forward, and the embedder moves in with the forward.
    if sw.caption_once and not streamed:
        from . import caption_once

        if caption_once.install(pipe.transformer) is not None:
            applied.append("caption_once")
    return applied
