"""cuDNN's 8-bit flash attention for the fp8 blocks (speed switch `cudnn_fp8_attention`; nvidia-cudnn-frontend).

Why: in the fp8 step the GEMMs are at the fp8 floor and attention is a quarter of the step (H100, 2026-12-07: 16.1 of
~65 ms), still on bf16 operands. cuDNN's FP8 forward (`sdpa_fp8`, e4m3 q/k/v/O) ran 308.8 us against its bf16
kernel's 428.0 us at 4352 tokens (bench/cudnn_fp8_attention.py, H100 2026-12-07: 942 against 680 TFLOP/s), but lost
with its operands quantized by separate passes (1058 us in all). Here no pass is added but one reduction:

    q, k   scaled by a bound taken from the q/k norms' weights (kernels.qk_bound_scales) inside the q/k norm + RoPE
           kernel, which now writes e4m3 instead of bf16 (kernels.qkv_e4m3);
    v      one amax reduction over v, then scaled to e4m3 in the same kernel;
    O      written by cuDNN as e4m3 with v's scale times 15/16 (|O| <= amax|v|: softmax rows sum to one; the headroom
           covers P's rounding, kernels.O_HEADROOM), which is what the to_out GEMM reads with the inverse as its row
           scales -- the attention output's own quantization pass (kernels.quantize_heads) is gone.

Hopper cannot write bf16 O from e4m3 inputs ("only supported on Blackwell"), which is why O stays e4m3. The softmax
probabilities go through e4m3 inside cuDNN with scale 448 (P <= 1), as Transformer Engine does.

Predicted (H100, Standard fp8): attention -119 us a block, quantize_heads -17 us, q/k written in half the bytes; v's
amax and quantization +~28 us: ~-100 us a block, x 32 blocks x 8 steps ~ -25 ms a generation. Error: ~0.06 rel-L2 per
attention (the frontend bench), like the Triton 8-bit kernel, whose latents moved by rel-L2 ~0.02 (fp8_attention.py).

One cuDNN graph per (batch, tokens, heads, head, device), built on the first call of a shape (eager, before any CUDA
graph capture); calls go on the current stream, so they run inside the step graphs. `attention_e4m3_reference` is the
same arithmetic in PyTorch without P's rounding: what a CPU runs (tests/test_fastblocks.py).
"""

from __future__ import annotations

import functools
import gc
import logging
import math

import torch

from . import fp8

log = logging.getLogger("zimage.cudnn_attention")

P_SCALE = fp8.E4M3_MAX  # the softmax probabilities (<= 1) to e4m3


@functools.cache
def _frontend():
    torch.backends.cudnn.version()  # torch's libcudnn loads before the frontend looks for one
    import cudnn

    return cudnn


@functools.cache
def _available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available() or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        _frontend()
    except Exception:  # noqa: BLE001 - not installed, or its libraries cannot load: the bf16 attention runs
        return False
    return True


def available(device) -> bool:
    """cuDNN's fp8 attention can run on `device`: a CUDA GPU of compute capability >= 9.0 and nvidia-cudnn-frontend."""
    return _available(torch.device(device))


def build(graph, device) -> torch.Tensor:
    """Validate a frontend graph, pick its plan (heuristic A, else the fallback) and build it; returns its workspace.
    Raises where cuDNN does not support the graph on this GPU."""
    cudnn = _frontend()
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return torch.empty(max(graph.get_workspace_size(), 1), dtype=torch.uint8, device=device)


@functools.cache
def _handle(device: torch.device):
    """One cuDNN handle per device for every graph (its stream is set at each call)."""
    with torch.cuda.device(device):
        return _frontend().create_handle()


class _Graph:
    """One sdpa_fp8 graph over (B, S, H, D) memory (cuDNN's logical (B, H, S, D) dims with BSHD strides)."""

    def __init__(self, device: torch.device, batch: int, seq: int, heads: int, head: int):
        cudnn = _frontend()
        self.handle = _handle(device)
        dims, strides = [batch, heads, seq, head], [seq * heads * head, head, heads * head, 1]
        one, f32, e4m3 = [1, 1, 1, 1], cudnn.data_type.FLOAT, cudnn.data_type.FP8_E4M3
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=self.handle)
        t = {n: g.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in ("q", "k", "v")}
        for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            t[n] = g.tensor(name=n, dim=one, stride=one, data_type=f32)
        o, _, t["amax_s"], t["amax_o"] = g.sdpa_fp8(
            q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
            descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
            generate_stats=False, attn_scale=1.0 / math.sqrt(head), name="sdpa_fp8")
        o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
        for n in ("amax_s", "amax_o"):
            t[n].set_output(True).set_dim(one).set_stride(one).set_data_type(f32)
        t["o"] = o
        self.graph, self.t = g, t
        self.workspace = build(g, device)
        scalar = functools.partial(torch.full, (1, 1, 1, 1), dtype=torch.float32, device=device)
        self.constants = {t["scale_s"]: scalar(P_SCALE), t["descale_s"]: scalar(1.0 / P_SCALE),
                          t["amax_s"]: scalar(0.0), t["amax_o"]: scalar(0.0)}  # (the amaxes: written, unread)

    def __call__(self, q, k, v, descale_q, descale_k, descale_v, scale_o) -> torch.Tensor:
        cudnn, t = _frontend(), self.t
        o = torch.empty(q.shape, dtype=fp8.E4M3, device=q.device)
        four = lambda x: x.reshape(1, 1, 1, 1)  # noqa: E731
        pack = {t["q"]: q, t["k"]: k, t["v"]: v, t["o"]: o, t["descale_q"]: four(descale_q),
                t["descale_k"]: four(descale_k), t["descale_v"]: four(descale_v), t["scale_o"]: four(scale_o),
                **self.constants}
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return o


_GRAPHS: dict = {}  # (device, batch, tokens, heads, head) -> _Graph, or None where cuDNN refused the shape


def _graph(device: torch.device, batch: int, seq: int, heads: int, head: int) -> "_Graph | None":
    key = (device, batch, seq, heads, head)
    if key not in _GRAPHS:
        try:
            _GRAPHS[key] = _Graph(device, batch, seq, heads, head)
            log.info("cuDNN fp8 attention: graph built for %s", key[1:])
        except Exception as exc:  # noqa: BLE001 - e.g. a sequence length its kernels do not take: bf16 attention runs
            log.warning("cuDNN fp8 attention refused %s (%s); the bf16 attention runs it", key[1:], exc)
            _GRAPHS[key] = None
            gc.collect()  # the half-built graph is freed now, not by a later collection inside a graph capture
    return _GRAPHS[key]


def supported(device, batch: int, seq: int, heads: int, head: int) -> bool:
    """Whether attention of this shape can run on cuDNN's 8-bit kernel (its graph is built here on the first ask,
    eagerly: the blocks ask before they quantize anything, and before a step graph captures the shape). A CPU runs the
    reference, which takes any shape."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    if not available(device):
        return False
    if (device, batch, seq, heads, head) not in _GRAPHS and torch.cuda.is_current_stream_capturing():
        return False  # no graph can be built inside a capture: this capture keeps the bf16 attention
    return _graph(device, batch, seq, heads, head) is not None


def attention_e4m3(q, k, v, descale_q, descale_k, descale_v, scale_o) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for e4m3 q, k, v (B, S, H, D) with unit last stride (contiguous per tensor), each
    the true values times 1 / its descale (one-element float32 tensors); returns O (B, S, H, D) e4m3, the true output
    times scale_o. CUDA: cuDNN's graph (ask `supported` first); elsewhere the reference."""
    if not q.is_cuda:
        return attention_e4m3_reference(q, k, v, descale_q, descale_k, descale_v, scale_o)
    graph = _graph(q.device, *q.shape)
    if graph is None:
        raise RuntimeError(f"cuDNN's fp8 attention does not take {tuple(q.shape)} (ask supported() first)")
    return graph(q, k, v, descale_q, descale_k, descale_v, scale_o)


def attention_e4m3_reference(q, k, v, descale_q, descale_k, descale_v, scale_o) -> torch.Tensor:
    qf, kf, vf = (x.float().transpose(1, 2) * s.float().reshape(()) for x, s in
                  ((q, descale_q), (k, descale_k), (v, descale_v)))
    o = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf).transpose(1, 2)
    return (o * scale_o.float().reshape(())).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(fp8.E4M3)
