"""Time and check attention on 8-bit operands (zimage/fp8_attention.py) against the bf16 kernels it would replace,
at the presets' sequence lengths, on a CUDA GPU.

    python bench/attention.py --out attention.json [--sweep] [--tokens 4352,9472]

Inputs as the block schedule hands them over (fastblocks.py): q and k per-head RMS-normalised (times a norm
weight) in one (2, rows, 3840) tensor, v a strided slice of the fused q/k/v output; 30 heads of 128. Candidates:
SDPA with cuDNN (what `native` picks on Hopper), SDPA flash, FlashAttention-4 where installed, and the 8-bit kernel
with int8 or e4m3 q/k (its quantization timed alone too). Per candidate: time per call (CUDA events over a CUDA
graph of 20 calls, median of 5), TFLOP/s (4 S^2 H D), and rel-L2 against float32 attention. `--sweep` times the
8-bit kernel's launch parameters at the first --tokens and writes the fastest as `best_config`
(bench/latency.py --attention-config reads it). Prints a table; writes JSON.

`--vae` times the VAE decoder's mid-block attention instead (zimage/vae_attention.py): one head of 512 over every
latent pixel, q, k, v (1, 1, S, 512) bf16, S = 16384 / 25600 / 9216 (Standard 1024^2, High 1280^2, Draft 768^2; or
--vae-tokens): SDPA as PyTorch dispatches it (head dim 512: the memory-efficient kernel) against
`zimage::gemm_attention` (two GEMMs and a float32 softmax); same timing and columns, rows named `vae ...`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.kernels import rel_l2, time_ms  # noqa: E402
from zimage import fastattn, fp8_attention, vae_attention  # noqa: E402

HEADS, HEAD = 30, 128
# image patches + 256 caption tokens; Standard first (the sweep tunes at the first length), and a length that is not a
# multiple of the key block (a short caption: 96 tokens), whose last block is masked
PRESET_TOKENS = {"Standard": 4352, "Standard, short caption": 4192, "Draft": 2560, "High": 6656, "Ultra": 9472}
VAE_HEAD = 512
VAE_TOKENS = {"Standard": 16384, "High": 25600, "Draft": 9216}  # latent pixels: (side / 8)^2
SWEEP = {"block_m": [64, 128], "block_n": [64, 128], "num_warps": [4, 8], "num_stages": [2, 3, 4]}


def inputs(tokens: int):
    """q, k, v (1, S, 30, 128) bf16 views laid out like the block schedule's."""
    dim, dev = HEADS * HEAD, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(tokens, 3 * dim, device=dev, generator=g, dtype=torch.bfloat16) * 2
    heads = qkv[:, :2 * dim].float().view(tokens, 2, HEADS, HEAD)
    weight = 1 + 0.3 * torch.randn(HEAD, device=dev, generator=g)
    normed = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    qk = normed.permute(1, 0, 2, 3).reshape(2, tokens, dim).to(torch.bfloat16).contiguous()
    shape = (1, tokens, HEADS, HEAD)
    return qk[0].view(shape), qk[1].view(shape), qkv[:, 2 * dim:].view(shape)


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return call


def eight_bit(fmt: str):
    def call(q, k, v):
        fp8_attention.QK_FORMAT = fmt
        return fp8_attention.attention(q, k, v)
    return call


def candidates() -> dict:
    from torch.nn.attention import SDPBackend

    found = {"sdpa cudnn (bf16)": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa flash (bf16)": sdpa(SDPBackend.FLASH_ATTENTION),
             "8-bit, int8 qk": eight_bit("int8"), "8-bit, e4m3 qk": eight_bit("e4m3")}
    if fastattn.fa4_supported("cuda"):
        found["fa4 (bf16)"] = lambda q, k, v: fastattn.fa4_attention(q, k, v, HEAD ** -0.5)
    return found


def timed(row: dict, call, qkv: tuple, exact: torch.Tensor, flops: float) -> None:
    """One candidate's agreement with float32 attention and its time per call, into `row`."""
    out = call(*qkv)
    row["rel_l2_vs_fp32"] = round(rel_l2(out, exact), 5)
    row["finite"] = bool(torch.isfinite(out).all())
    row["us"] = round(1e3 * time_ms(lambda: call(*qkv), calls=20), 1)
    row["tflops"] = round(flops / row["us"] / 1e6, 1)


def measure(tokens: int, rows: list) -> None:
    q, k, v = inputs(tokens)
    exact = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    flops = 4 * tokens * tokens * HEADS * HEAD
    for name, call in candidates().items():
        row = {"tokens": tokens, "candidate": name}
        try:
            timed(row, call, (q, k, v), exact, flops)
            if name.startswith("8-bit"):  # its QK_FORMAT is set by the call above
                row["quantize_us"] = round(1e3 * time_ms(lambda: fp8_attention.quantize_inputs(q, k, v), calls=20), 1)
                row["config"] = dict(fp8_attention.CONFIG)
        except Exception as exc:  # noqa: BLE001 - one candidate failing must not hide the others
            row["error"] = repr(exc)[:400]
        rows.append(row)
        print(json.dumps(row), flush=True)


def measure_vae(tokens: int, rows: list) -> None:
    """The VAE decoder's attention at `tokens` latent pixels: SDPA (PyTorch's choice) vs zimage::gemm_attention."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 1, tokens, VAE_HEAD, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4 * tokens * tokens * VAE_HEAD
    for name, call in {"vae sdpa (bf16)": F.scaled_dot_product_attention,
                       "vae gemm_attention": torch.ops.zimage.gemm_attention}.items():
        row = {"tokens": tokens, "candidate": name}
        try:
            timed(row, call, (q, k, v), exact, flops)
            if "gemm" in name:  # q k^T straight into float32 (aten baddbmm.dtype), or through float32 copies
                row["out_dtype_gemm"] = vae_attention._out_dtype_gemm
                row["chunk"] = vae_attention.chunk_rows(1, tokens)
        except Exception as exc:  # noqa: BLE001 - one candidate failing must not hide the other
            row["error"] = repr(exc)[:400]
        rows.append(row)
        print(json.dumps(row), flush=True)
    del exact


def sweep(tokens: int) -> dict:
    """The fastest launch parameters of the 8-bit kernel (int8 qk) at `tokens`; every timing in `tried`."""
    q, k, v = inputs(tokens)
    fp8_attention.QK_FORMAT = "int8"
    want = fp8_attention.attention_reference(*fp8_attention.quantize_inputs(q, k, v), HEAD ** -0.5)
    default, tried = dict(fp8_attention.CONFIG), []
    for values in itertools.product(*SWEEP.values()):
        config = dict(zip(SWEEP, values))
        fp8_attention.CONFIG.update(config)
        try:
            error = rel_l2(fp8_attention.attention(q, k, v), want)
            us = 1e3 * time_ms(lambda: fp8_attention.attention(q, k, v), calls=20)
            tried.append({**config, "us": round(us, 1), "rel_l2_vs_reference": round(error, 5)})
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this tile size
            tried.append({**config, "error": repr(exc)[:200]})
        print(json.dumps(tried[-1]), flush=True)
    fp8_attention.CONFIG.clear()
    fp8_attention.CONFIG.update(default)
    ok = [t for t in tried if "us" in t and t["rel_l2_vs_reference"] < 0.02]  # the interpreter: <= 0.017
    best = min(ok, key=lambda t: t["us"]) if ok else None
    return {"tokens": tokens, "tried": tried,
            "best_config": {k: best[k] for k in SWEEP} if best else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default=",".join(str(t) for t in PRESET_TOKENS.values()))
    ap.add_argument("--out", default="attention.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--vae", action="store_true", help="time the VAE decoder's attention (one head of 512) instead")
    ap.add_argument("--vae-tokens", default=",".join(str(t) for t in VAE_TOKENS.values()))
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.vae:
        args.sweep, tokens = False, []
        rows = result["rows"] = []
        for t in (int(t) for t in args.vae_tokens.split(",")):
            measure_vae(t, rows)
            Path(args.out).write_text(json.dumps(result, indent=1))
    if args.sweep:
        result["sweep"] = sweep(tokens[0])
        if result["sweep"]["best_config"]:
            fp8_attention.CONFIG.update(result["sweep"]["best_config"])
        result["best_config"] = result["sweep"]["best_config"]
    rows = result.setdefault("rows", [])
    for t in tokens:
        measure(t, rows)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{'tokens':>6} {'candidate':<20} {'us':>8} {'TFLOP/s':>8} {'quant us':>8} {'rel-L2':>8}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['candidate']:<20} {r.get('us', float('nan')):>8} {r.get('tflops', float('nan')):>8} "
              f"{r.get('quantize_us', ''):>8} {r.get('rel_l2_vs_fp32', float('nan')):>8}  {r.get('error', '')[:60]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
