"""Attention on 8-bit operands (zimage/fp8_attention.py) on the CPU: the quantization and the PyTorch reference
against exact attention, the block schedule with it against diffusers' blocks, and -- where Triton is installed --
the Triton kernels in Triton's interpreter against the reference."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.test_fastattn import rel_l2
from zimage import fp8, fp8_attention

ROOT = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16


def exact(q, k, v, scale=None):
    """float32 attention of (B, S, H, D) tensors, (B, S, H, D) out."""
    out = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), scale=scale)
    return out.transpose(1, 2)


def model_like(batch, seq, heads, head, seed=0, tile_scales=(1.0,)):
    """q and k as the blocks hand them over -- per-head RMS-normalised (times a norm weight) -- and v unnormalised;
    successive 128-token tiles of v (and k) scaled by `tile_scales` in turn, so the per-tile scales matter."""
    g = torch.Generator().manual_seed(seed)

    def normed():
        x = torch.randn(batch, seq, heads, head, generator=g)
        weight = 1 + 0.3 * torch.randn(head, generator=g)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    q, k, v = normed(), normed(), 2 * torch.randn(batch, seq, heads, head, generator=g)
    factors = torch.tensor(tile_scales)[torch.arange(seq) // fp8_attention.TILE % len(tile_scales)]
    k, v = k * factors[None, :, None, None].sqrt(), v * factors[None, :, None, None]
    return q.to(BF16), k.to(BF16), v.to(BF16)


def quantized(q, k, v, fmt, smooth=True):
    """The reference's inputs as fp8_attention.attention makes them (k smoothed: its mean over the tokens removed)."""
    mean = k.mean(dim=1, dtype=torch.float32) if smooth else None
    return (*fp8_attention.quantize_tiles_reference(q, fmt=fmt),
            *fp8_attention.quantize_tiles_reference(k, fmt=fmt, subtract=mean),
            *fp8_attention.quantize_tiles_reference(v, transpose=True))


@pytest.mark.parametrize("fmt", ["int8", "e4m3"])
def test_tile_quantization_round_trips(fmt):
    x = model_like(2, 300, 3, 32, tile_scales=(1.0, 30.0, 0.01))[2]
    for transpose in (False, True):
        q, scale = fp8_attention.quantize_tiles_reference(x, transpose=transpose, fmt=fmt)
        assert q.dtype == (torch.int8 if fmt == "int8" else fp8.E4M3)
        assert scale.shape == (2, 3, 3) and q.shape == ((2, 3, 32, 300) if transpose else (2, 3, 300, 32))
        values = q.float().transpose(-1, -2) if transpose else q.float()
        back = (values * fp8_attention._per_token(scale, 300)[..., None]).transpose(1, 2)
        # every tile on its own scale: the 0.01 tiles are as exact as the 30x ones
        for t in range(3):
            rows = slice(128 * t, min(128 * (t + 1), 300))
            error = rel_l2(back[:, rows], x[:, rows])
            assert error < (0.01 if fmt == "int8" else 0.04), (t, error)
        top = 127 if fmt == "int8" else 448
        assert float(values.abs().amax()) == top  # each tile's largest magnitude takes the format's largest code


# Bounds from the rounding itself on these inputs (random v: no structure to average the errors away): e4m3 v and P
# ~0.027 each; the logits' error ~0.031 with int8 q/k, ~0.070 with e4m3. A wrong scale is off by ~1.
@pytest.mark.parametrize("fmt, bound", [("int8", 0.05), ("e4m3", 0.09)])
def test_reference_is_close_to_exact_attention(fmt, bound):
    q, k, v = model_like(1, 400, 2, 64, tile_scales=(1.0, 8.0, 0.05))
    out = fp8_attention.attention_reference(*quantized(q, k, v, fmt), 64 ** -0.5)
    assert out.shape == q.shape and out.dtype == BF16 and bool(torch.isfinite(out).all())
    error = rel_l2(out, exact(q, k, v))
    assert error < bound, error
    # the bf16 output's own rounding is far below that, and a wrong scale is far above it
    assert rel_l2(exact(q, k, v).to(BF16), exact(q, k, v)) < 0.005
    q8, sq, k8, sk, v8, sv = quantized(q, k, v, fmt)
    wrong = fp8_attention.attention_reference(q8, sq, k8, sk.flip(-1), v8, sv, 64 ** -0.5)
    assert rel_l2(wrong, exact(q, k, v)) > 4 * bound


def test_peaked_attention_keeps_its_peak():
    """A query that matches one key strongly: the output is (nearly) that key's value, as in exact attention."""
    q, k, v = model_like(1, 256, 1, 64, seed=3)
    k[0, 200] = q[0, 17] * 4  # logit ~ 4 x 64 / 8 = 32 above the rest
    out = fp8_attention.attention_reference(*quantized(q, k, v, "int8"), 64 ** -0.5)
    assert rel_l2(out[0, 17], v[0, 200]) < 0.05
    assert rel_l2(out[0, 17], exact(q, k, v)[0, 17]) < 0.05


@pytest.mark.parametrize("fmt", ["int8", "e4m3"])
def test_a_bias_all_keys_share_costs_nothing_with_smoothing(fmt):
    """softmax(q . (k + b)) = softmax(q . k): exact attention ignores a bias every key shares, and with k smoothed the
    8-bit attention does too; quantized as they come, large shared channels take the range from what differs."""
    q, k, v = model_like(1, 300, 2, 64, seed=5)
    g = torch.Generator().manual_seed(6)
    bias = torch.zeros(1, 1, 2, 64)
    bias[..., torch.randperm(64, generator=g)[:4]] = 20.0  # a few outlier channels, as SageAttention describes
    biased = (k.float() + bias).to(BF16)
    want = exact(q, biased, v)
    assert rel_l2(want, exact(q, k, v)) < 0.02  # (only bf16's coarser rounding of the biased keys)
    plain = rel_l2(fp8_attention.attention_reference(*quantized(q, k, v, fmt, smooth=False), 0.125), exact(q, k, v))
    smoothed = rel_l2(fp8_attention.attention_reference(*quantized(q, biased, v, fmt), 0.125), want)
    unsmoothed = rel_l2(fp8_attention.attention_reference(*quantized(q, biased, v, fmt, smooth=False), 0.125), want)
    # measured: int8 0.042 / 0.042 / 0.066, e4m3 0.060 / 0.059 / 0.14 (plain / smoothed / unsmoothed)
    assert smoothed < 1.15 * plain + 0.005 and unsmoothed > 1.4 * smoothed, (plain, smoothed, unsmoothed)


def test_attention_on_the_cpu_is_the_reference():
    q, k, v = model_like(2, 150, 3, 32)
    got = fp8_attention.attention(q, k, v)
    want = fp8_attention.attention_reference(*quantized(q, k, v, fp8_attention.QK_FORMAT), 32 ** -0.5)
    assert torch.equal(got, want)
    assert fp8_attention.supported(q) and not fp8_attention.supported(q[..., :24]) and not fp8_attention.supported(
        q.float())


def test_block_schedule_with_8bit_attention_is_close_to_diffusers_blocks():
    from tests.test_fastblocks import block_inputs, diffusers_blocks, prepared
    from tests.test_fastattn import inputs
    from zimage import fastblocks

    for quantize, bound in ((False, 0.012), (True, 0.04)):  # measured 0.0064 and 0.024 (without: 0.0052, 0.023)
        model = prepared(quantize)
        hidden, _, freqs, adaln = block_inputs(model, *inputs(BF16))[:4]
        reference = diffusers_blocks(model, hidden, freqs, adaln)
        with torch.no_grad():
            plain = fastblocks.Schedule(allow_cpu=True).run(model.layers, hidden, freqs, adaln)
            low = fastblocks.Schedule(allow_cpu=True, fp8_attention=True).run(model.layers, hidden, freqs, adaln)
        assert low is not None and bool(torch.isfinite(low).all())
        assert not torch.equal(low, plain)  # the 8-bit attention ran
        assert rel_l2(low, reference) < bound, (quantize, rel_l2(low, reference), rel_l2(plain, reference))


# ---- the Triton kernels, in Triton's interpreter (a fresh process: TRITON_INTERPRET is read at import) ------------
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def _round_fp8_like_the_gpu():
    """Triton's interpreter converts float32 to e4m3 by its own bit arithmetic, which halves values that round up
    to the next power of two (126.5 -> 64); the GPU's conversion (cvt.rn.satfinite) rounds to nearest like PyTorch.
    Here the interpreter converts to e4m3 through PyTorch, so the kernels are checked against what the GPU does."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    original = interpreter._convert_float

    def convert(values, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.float8e4nv and input_dtype in (tl.float32, tl.bfloat16):
            raw = np.ascontiguousarray(values)
            x = (torch.from_numpy(raw.view(np.float32)) if input_dtype == tl.float32
                 else torch.from_numpy(raw.view(np.int16)).view(BF16).float())
            return x.to(fp8.E4M3).view(torch.uint8).numpy().reshape(values.shape)
        return original(values, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert


def check_kernels() -> dict:
    """{case: (error, bound)}: the kernels' codes and scales against the reference's (equal), and their output
    against the reference (one key block: rounding only; several: P rounds against a running maximum)."""
    _round_fp8_like_the_gpu()
    errors = {}
    for block_m, block_n in ((128, 128), (64, 64), (64, 128)):
        fp8_attention.CONFIG.update(block_m=block_m, block_n=block_n)
        for fmt in ("int8", "e4m3"):
            fp8_attention.QK_FORMAT = fmt
            for batch, seq, heads, head in ((1, 100, 2, 32), (2, 300, 3, 32), (1, 256, 1, 64), (1, 520, 1, 128)):
                q, k, v = model_like(batch, seq, heads, head, seed=seq, tile_scales=(1.0, 20.0, 0.02))
                case = f"{fmt} {batch}x{seq}x{heads}x{head} blocks {block_m}/{block_n}"
                mean = k.mean(dim=1, dtype=torch.float32)
                for name, x, transpose, f, sub in (("q", q, False, fmt, None), ("k", k, False, fmt, mean),
                                                   ("v", v, True, "e4m3", None)):
                    got, got_scale = fp8_attention.quantize_tiles(x, transpose=transpose, fmt=f, subtract=sub)
                    want, want_scale = fp8_attention.quantize_tiles_reference(x, transpose=transpose, fmt=f,
                                                                              subtract=sub)
                    differ = int((got.view(torch.uint8) != want.view(torch.uint8)).sum())
                    errors[f"{case} {name} codes differing"] = (differ, 0)
                    errors[f"{case} {name} scales"] = (rel_l2(got_scale, want_scale), 1e-6)
                out = fp8_attention.attention(q, k, v)
                want = fp8_attention.attention_reference(*quantized(q, k, v, fmt), head ** -0.5)
                one_block = seq <= block_n
                errors[f"{case} output vs reference"] = (rel_l2(out, want), 0.008 if one_block else 0.04)
                errors[f"{case} output vs exact"] = (rel_l2(out, exact(q, k, v)), 0.06 if fmt == "int8" else 0.12)
    return errors


@needs_triton
def test_triton_kernels_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)}
    done = subprocess.run([sys.executable, __file__, "check_kernels"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == 3 * 2 * 4 * 8
    for name, (error, bound) in errors.items():
        assert error <= bound, (name, error, bound)


# ---- the kernels compiled for Hopper (sm_90a) on the CPU: Triton's own compiler and the ptxas its wheel carries ------
def _ptxas() -> Path | None:
    import triton

    found = [Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name for name in ("ptxas-blackwell", "ptxas")]
    return next((p for p in found if p.is_file()), None)


needs_ptxas = pytest.mark.skipif(importlib.util.find_spec("triton") is None or _ptxas() is None,
                                 reason="Triton with its ptxas is not installed")


@needs_ptxas
@pytest.mark.parametrize("fmt", ["int8", "e4m3"])
def test_kernel_compiles_for_hopper_onto_the_tensor_cores_without_spills(fmt):
    """What only a GPU run would otherwise show: both products become Hopper's asynchronous tensor-core instruction
    (wgmma: s8 x s8 -> s32 or e4m3 x e4m3 -> f32, then e4m3 x e4m3 -> f32), the key/value tiles are copied
    asynchronously (software pipelining), and the default launch parameters fit the registers without spilling.
    Arguments are marked 16-divisible as Triton's launcher specializes them at the presets' lengths (all multiples
    of 16). (The device has an older Triton than CI; its code may differ in detail.)"""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = fp8_attention._triton().attention_kernel
    element = "*i8" if fmt == "int8" else "*fp8e4nv"
    types = {"q_ptr": element, "k_ptr": element, "vt_ptr": "*fp8e4nv", "sq_ptr": "*fp32", "sk_ptr": "*fp32",
             "sv_ptr": "*fp32", "sv_max_ptr": "*fp32", "o_ptr": "*bf16", "so_b": "i32", "so_s": "i32", "so_h": "i32",
             "seq": "i32", "heads": "i32", "tiles": "i32", "qk_scale": "fp32", "fp8_max": "fp32"}
    cfg = fp8_attention.CONFIG
    constants = {"D": 128, "TILE": fp8_attention.TILE, "BLOCK_M": cfg["block_m"], "BLOCK_N": cfg["block_n"]}
    assert set(kernel.arg_names) == set(types) | set(constants)
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    aligned = [n for n in types if n.endswith("_ptr")] + ["so_b", "so_s", "so_h", "seq"]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    ptx = compiled.asm["ptx"]
    products = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.(\w+\.\w+\.\w+)", ptx))
    assert products == ({"s32.s8.s8", "f32.e4m3.e4m3"} if fmt == "int8" else {"f32.e4m3.e4m3"}), products
    assert "cp.async" in ptx and "mma.sync" not in ptx
    assert compiled.metadata.shared <= 227 * 1024
    ptx_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"zimage-fp8-attention-{os.getpid()}-{fmt}.ptx"
    ptx_file.write_text(ptx)
    try:
        done = subprocess.run([str(_ptxas()), "-arch=sm_90a", "-v", str(ptx_file), "-o", os.devnull],
                              capture_output=True, text=True, timeout=300)
    finally:
        ptx_file.unlink()
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-2000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    assert spills and max(spills) == 0, report


if __name__ == "__main__":  # the interpreted check: its errors as the last line of stdout
    print(json.dumps(globals()[sys.argv[1]]()))
