"""The main blocks on hand-scheduled kernels (zimage/fastblocks.py) against diffusers' blocks, on the CPU: the
schedule through the kernels' PyTorch references in bf16 and fp8, and -- where Triton is installed -- through the
Triton kernels themselves in Triton's interpreter. When the schedule must not run (a LoRA branch, unfused blocks,
an attention mask), diffusers' blocks do."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_fastattn import inputs, rel_l2, run, small_transformer
from zimage import fastattn, fastblocks, fp8, fusion, kernels, lora, speed

BF16 = torch.bfloat16
ROOT = Path(__file__).resolve().parents[1]


def prepared(quantize: bool, fuse: bool = True):
    model = small_transformer(BF16)
    if quantize:
        fp8.quantize_module(model, speed.FP8_EXCLUDED)
    fastattn.install(model)
    if fuse:
        fusion.install(model)
    return model


def block_inputs(model, x, t, cap, stack: str = "layers"):
    """What the transformer hands the blocks of `stack`: (x, mask, freqs, adaln, ...); the caption refiner's get
    no adaln."""
    seen = []
    first = getattr(model, stack)[0]
    hook = first.register_forward_pre_hook(lambda module, args: seen.append(args) if not seen else None)
    try:
        run(model, x, t, cap)
    finally:
        hook.remove()
    return seen[0]


def diffusers_blocks(model, hidden, freqs, adaln, stack: str = "layers"):
    with torch.no_grad():
        for block in getattr(model, stack):
            hidden = block(hidden, None, freqs, adaln)
    return hidden


def schedule_output(model, hidden, freqs, adaln, stack: str = "layers"):
    with torch.no_grad():
        return fastblocks.Schedule(allow_cpu=True).run(getattr(model, stack), hidden, freqs, adaln)


# bf16: float32 math between bf16 tensors vs diffusers' bf16 roundings (measured on this model: 0.005-0.006).
# fp8: both quantize at slightly different points, so their e4m3 codes differ here and there (0.023-0.053 between
# them); the schedule must then be as close to the bf16 blocks as diffusers' own fp8 blocks are.
BOUNDS = {False: 0.01, True: 0.08}


def check_against_diffusers(stack: str, quantize: bool) -> None:
    model = prepared(quantize)
    args = block_inputs(model, *inputs(BF16), stack=stack)
    hidden, mask, freqs = args[:3]
    adaln = args[3] if len(args) > 3 else None
    assert mask is None and (adaln is None) == (stack == "context_refiner")  # one prompt; the caption has no adaLN
    reference = diffusers_blocks(model, hidden, freqs, adaln, stack)
    got = schedule_output(model, hidden, freqs, adaln, stack)
    assert got is not None and got.shape == reference.shape and got.dtype == BF16
    error = rel_l2(got, reference)
    assert error <= BOUNDS[quantize], error
    # The blocks change their input far more than the bound: an identity or half-done schedule cannot pass.
    assert rel_l2(hidden, reference) > 5 * BOUNDS[quantize]
    if quantize:
        exact = diffusers_blocks(prepared(False), hidden, freqs, adaln, stack)  # the same weights in bf16
        assert rel_l2(got, exact) <= 1.1 * rel_l2(reference, exact) + 1e-3, (rel_l2(got, exact),
                                                                              rel_l2(reference, exact))


@pytest.mark.parametrize("quantize", [False, True])
def test_schedule_matches_diffusers_blocks(quantize):
    check_against_diffusers("layers", quantize)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("stack", ["noise_refiner", "context_refiner"])
def test_the_refiners_too(stack, quantize):
    """The image refiner's blocks are modulated like the main ones; the caption refiner's have no adaLN at all."""
    check_against_diffusers(stack, quantize)


@pytest.mark.parametrize("stack", ["layers", "noise_refiner", "context_refiner"])
def test_cudnn_fp8_attention_schedule(stack):
    """The fp8 blocks with attention on e4m3 operands (q/k scaled by their norms' bound, v by its amax, O written in
    v's scale and read by to_out with v's descale per row), cuDNN's kernel replaced by its PyTorch reference: as close
    to diffusers' fp8 blocks as the fp8 schedule is, and no further from the bf16 blocks than 1.3x diffusers' own fp8
    blocks are. A wrong scale or descale anywhere is off by orders of magnitude."""
    model = prepared(True)
    args = block_inputs(model, *inputs(BF16), stack=stack)
    hidden, freqs, adaln = args[0], args[2], args[3] if len(args) > 3 else None
    reference = diffusers_blocks(model, hidden, freqs, adaln, stack)
    with torch.no_grad():
        schedule = fastblocks.Schedule(allow_cpu=True, cudnn_fp8_attention=True)
        got = schedule.run(getattr(model, stack), hidden, freqs, adaln)
    assert got is not None and got.dtype == BF16
    assert rel_l2(got, reference) <= BOUNDS[True], rel_l2(got, reference)
    exact = diffusers_blocks(prepared(False), hidden, freqs, adaln, stack)
    assert rel_l2(got, exact) <= 1.3 * rel_l2(reference, exact) + 1e-3, (rel_l2(got, exact), rel_l2(reference, exact))


def test_qk_bound_scales_never_saturate():
    """A head holding one non-zero value reaches the RMSNorm's bound, sqrt(head) * max|w|: scaled, it lands on the
    e4m3 maximum and no further, whatever the rotation. v maps its amax to 448, and O's scale leaves headroom."""
    torch.manual_seed(0)
    heads, head, rows = 2, 32, 8
    dim = heads * head
    q_weight, k_weight = torch.rand(head) + 0.5, torch.rand(head) * 3
    q_weight[5], k_weight[6] = 4.0, -7.0  # the largest magnitudes, at an even and an odd position
    qkv = torch.zeros(rows, 3 * dim)
    qkv[:, 5], qkv[:, dim + head + 6] = 1.0, -2.0  # one value per head: |x|/rms = sqrt(head)
    qkv[:, 2 * dim:] = torch.randn(rows, dim)
    angles = torch.rand(rows, head // 2) * 6.3
    freqs = torch.stack((angles.cos(), angles.sin()), dim=-1).reshape(rows, head)
    bound = kernels.qk_bound_scales(q_weight, k_weight)
    qk = kernels._qk_norm_rope_float(qkv, q_weight, k_weight, freqs, heads, 1e-9) * bound[:, None, None]
    assert qk.abs().amax() <= fp8.E4M3_MAX * (1 + 1e-5)
    assert qk[0].abs().amax() >= 0.99 * fp8.E4M3_MAX / 2 ** 0.5  # rotated: the pair's norm, shared between two
    out, scales, o_descale = kernels.qkv_e4m3(qkv.to(BF16), q_weight, k_weight, freqs, heads, 1e-9)
    assert out.dtype == fp8.E4M3 and out.float().isfinite().all()
    v = qkv[:, 2 * dim:].to(BF16).float()
    v_descale = v.abs().amax() / fp8.E4M3_MAX
    assert torch.allclose(scales, torch.stack([1 / bound[0], 1 / bound[1], v_descale,
                                               kernels.O_HEADROOM / v_descale]))
    assert torch.allclose(o_descale, (v_descale / kernels.O_HEADROOM).expand(rows, 1))
    assert torch.allclose(out[2].float() * v_descale, v, rtol=0.07, atol=1e-3 * v_descale)


def test_the_wrong_kind_of_call_is_refused():
    """adaln for blocks without modulation, or none for modulated ones: not scheduled (diffusers' blocks run)."""
    model = prepared(False)
    for stack in ("layers", "context_refiner"):
        args = block_inputs(model, *inputs(BF16), stack=stack)
        adaln = args[3] if len(args) > 3 else None
        other = torch.zeros(1, 256, dtype=BF16) if adaln is None else None
        assert fastblocks.Schedule(allow_cpu=True).run(getattr(model, stack), args[0], args[2], other) is None


# Triton's interpreter is chosen when Triton is imported (TRITON_INTERPRET=1), so these run in a fresh process.
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def interpreted(check: str, script: str = __file__) -> dict:
    """Run `check` (a function of `script`, a test module, returning {name: (error, bound)}) under Triton's
    interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)}
    done = subprocess.run([sys.executable, script, check], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_schedule(fused_gemms: bool = False, modes=(False, True), stacks=("layers", "context_refiner"),
                   cudnn_fp8_attention: bool = False) -> dict:
    """The interpreter rounds to bf16 and e4m3 by truncation, not to nearest, so the bounds are wider than above; a
    wrong index or formula is off by ~1. `fused_gemms`: with the GEMMs' epilogues (tests/test_fused_gemm.py);
    `modes`: fp8 off and/or on; `cudnn_fp8_attention`: fp8 attention on e4m3 operands (cuDNN's kernel's reference)."""
    errors = {}
    for quantize in modes:
        model = prepared(quantize)
        for stack in stacks:
            args = block_inputs(model, *inputs(BF16), stack=stack)
            hidden, freqs, adaln = args[0], args[2], args[3] if len(args) > 3 else None
            reference = diffusers_blocks(model, hidden, freqs, adaln, stack)
            with torch.no_grad():
                got = fastblocks.Schedule(allow_cpu=True, fused_gemms=fused_gemms,
                                          cudnn_fp8_attention=cudnn_fp8_attention).run(getattr(model, stack), hidden,
                                                                                        freqs, adaln)
            errors[f"{stack} fp8={quantize}"] = (rel_l2(got, reference), 0.03 if not quantize else 0.2)
    return errors


def check_schedule_e4m3_attention() -> dict:
    return check_schedule(modes=(True,), cudnn_fp8_attention=True)


def check_kernels() -> dict:
    torch.manual_seed(0)
    batch, seq, heads, head = 2, 5, 3, 32
    dim = heads * head
    x, branch = torch.randn(batch * seq, dim).to(BF16), torch.randn(batch * seq, dim).to(BF16)
    mod = torch.randn(batch, 4 * dim).to(BF16)
    w1, w2 = torch.randn(dim).to(BF16), torch.randn(dim).to(BF16)
    qkv = torch.randn(batch * seq, 3 * dim).to(BF16)
    freqs = torch.randn(batch * seq, head).float()
    o = torch.randn(batch, heads, seq, head).to(BF16).transpose(1, 2)  # SDPA's output layout, seen as BSHD
    h = torch.randn(batch * seq, 2 * 200).to(BF16)

    def dequantized(q, scale):
        return q.float() * scale

    def calls():
        out = {}
        for quant in (False, True):
            x_new, y, s = kernels.residual_norm(x, seq, 1e-5, branch, w1, mod[:, dim:2 * dim], w2, mod[:, :dim], quant)
            out[f"residual {quant}"] = x_new
            out[f"norm {quant}"] = dequantized(y, s) if quant else y
            _, y, s = kernels.residual_norm(x, seq, 1e-5, weight=w2, scale=mod[:, :dim], quant=quant)
            out[f"norm only {quant}"] = dequantized(y, s) if quant else y
            y, s = kernels.swiglu(h, quant)
            out[f"swiglu {quant}"] = dequantized(y, s) if quant else y
        out["qk"] = kernels.qk_norm_rope(qkv, w1[:head], w2[:head], freqs, heads, 1e-5)
        qkv8, scales, o_descale = kernels.qkv_e4m3(qkv, w1[:head], w2[:head], freqs, heads, 1e-5)
        out["qkv e4m3"] = torch.cat([qkv8[i].float() * scales[i] for i in range(3)])
        out["scales e4m3"] = torch.cat([scales, o_descale.flatten()])
        out["heads"] = dequantized(*kernels.quantize_heads(o))
        return out

    kernels.CONFIG["residual_norm"]["rows"] = 4  # several rows per program, the last one partly masked
    got = calls()  # Triton (interpreted): CPU tensors take the kernels under TRITON_INTERPRET=1
    os.environ["TRITON_INTERPRET"] = "0"
    reference = calls()  # the PyTorch references
    return {name: (rel_l2(got[name], value), 0.1 if "True" in name or name == "heads" or "e4m3" in name else 0.01)
            for name, value in reference.items()}


@needs_triton
@pytest.mark.parametrize("check", ["check_kernels", "check_schedule", "check_schedule_e4m3_attention"])
def test_triton_kernels_interpreted(check):
    errors = interpreted(check)
    assert errors
    for name, (error, bound) in errors.items():
        assert error <= bound, (name, error, bound)


def test_a_lora_branch_or_unfused_blocks_run_diffusers_blocks(tmp_path):
    model = prepared(False)
    hidden, _, freqs, adaln = block_inputs(model, *inputs(BF16))[:4]
    runtime = lora.LoraRuntime(lora.LoraLibrary(tmp_path), model, "cpu", BF16, rank=4, cache_bytes=0, mode="branch")
    schedule = fastblocks.Schedule(allow_cpu=True)
    with torch.no_grad():
        assert schedule.run(model.layers, hidden, freqs, adaln) is not None  # slots, no branch active: scheduled
        runtime.wrappers["layers.1.feed_forward.w2"].active = True
        assert schedule.run(model.layers, hidden, freqs, adaln) is None
        assert fastblocks.Schedule(allow_cpu=True).run(prepared(False, fuse=False).layers, hidden, freqs, adaln) is None
        # A complex RoPE table (diffusers' own processor) or a CPU tensor without allow_cpu: not scheduled either.
        assert fastblocks.Schedule().run(model.layers, hidden, freqs, adaln) is None
    assert schedule.runs == 1


if __name__ == "__main__":  # interpreted(): one check in this process, its errors as the last line of stdout
    print(json.dumps(globals()[sys.argv[1]]()))
