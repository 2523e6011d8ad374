"""The GEMMs with epilogues (zimage/fused_gemm.py) in Triton's interpreter on the CPU: each against the unfused
path it replaces (the GEMM, then the row kernel's PyTorch reference), and the block schedule with them against
diffusers' blocks. The interpreter rounds to bf16 and e4m3 by truncation, so the bounds are wider than a GPU's
(bench/kernels.py checks the GPU's); a wrong index, head or formula is off by ~1."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests import test_fastblocks
from tests.test_fastblocks import BF16, interpreted, needs_triton, prepared, rel_l2


def check_kernels() -> dict:
    from zimage import fp8, fused_gemm

    torch.manual_seed(0)
    rows, heads, head, k, hidden = 40, 2, 16, 64, 48  # 40 rows: the last row tile is partly outside
    dim = heads * head
    small = {"BM": 16, "BK": 32, "GROUP_M": 2, "num_stages": 2, "num_warps": 4}
    for name in fused_gemm.CONFIG:
        fused_gemm.CONFIG[name].update(small)
    fused_gemm.CONFIG["swiglu_gemm"]["BN"] = 16  # three column tiles of w1's and w3's rows each
    h = torch.randn(rows, k).to(BF16)
    w = (torch.randn(3 * dim, k) / 8).to(BF16)
    w13 = (torch.randn(2 * hidden, k) / 8).to(BF16)
    w13_odd = (torch.randn(2 * 40, k) / 8).to(BF16)
    q_w, k_w = torch.rand(head).to(BF16) + 0.5, torch.rand(head).to(BF16) + 0.5
    angles = torch.rand(rows, head // 2) * 6.28
    freqs = torch.stack((angles.cos(), angles.sin()), dim=-1).reshape(rows, head)
    hq, h_scale = fp8.quantize_rows(h.float())
    wq, w_scale = fp8.quantize_rows(w.float())
    w_scale = w_scale.reshape(1, -1).contiguous()
    cases = {
        "qkv bf16": (fused_gemm.qkv_norm_rope(h, None, w, None, q_w, k_w, freqs, heads, 1e-5),
                     fused_gemm.qkv_norm_rope_reference(h, None, w, None, q_w, k_w, freqs, heads, 1e-5)),
        "qkv fp8": (fused_gemm.qkv_norm_rope(hq, h_scale, wq, w_scale, q_w, k_w, freqs, heads, 1e-5),
                    fused_gemm.qkv_norm_rope_reference(hq, h_scale, wq, w_scale, q_w, k_w, freqs, heads, 1e-5)),
        "swiglu bf16": (fused_gemm.swiglu(h, w13), fused_gemm.swiglu_reference(h, w13)),
        # 40 = 2.5 column tiles: the last tile's columns past w1's rows are w3's, and must not be stored
        "swiglu bf16, a partial tile": (fused_gemm.swiglu(h, w13_odd), fused_gemm.swiglu_reference(h, w13_odd)),
        "plain bf16": (fused_gemm.gemm(h, None, w, None, dict(small, BN=16)), torch.nn.functional.linear(h, w)),
    }
    errors = {name: (rel_l2(got, want), 0.02) for name, (got, want) in cases.items()}
    # q and k really are normed and rotated (v is not): the epilogue's output differs from the bare GEMM's there.
    bare = torch.nn.functional.linear(h, w).float().reshape(rows, 3, dim).transpose(0, 1)
    got = cases["qkv bf16"][0].float()
    errors["q/k differ from the bare GEMM"] = (-rel_l2(got[:2], bare[:2]), -0.5)
    errors["v equals the bare GEMM"] = (rel_l2(got[2], bare[2]), 0.02)
    return errors


def check_schedule() -> dict:
    from zimage import fused_gemm

    fused_gemm.USE.update(dict.fromkeys(fused_gemm.USE, True))  # every epilogue, whatever the measured default
    calls = []
    for name in ("qkv_norm_rope", "swiglu"):  # count the fused calls: the schedule must take them, not the old path
        original = getattr(fused_gemm, name)
        setattr(fused_gemm, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    errors = test_fastblocks.check_schedule(fused_gemms=True)
    blocks = len(prepared(False).layers) + len(prepared(False).context_refiner)
    # bf16: both epilogues in every block; fp8: the q/k one only (w2's e4m3 input needs whole-row scales)
    errors["fused calls"] = (abs(calls.count("qkv_norm_rope") - 2 * blocks) + abs(calls.count("swiglu") - blocks), 0)
    # A GEMM left out of fused_gemm.USE keeps cuBLAS + its row kernel: bf16 with the SwiGLU epilogue only.
    fused_gemm.USE["qkv_gemm"] = False
    calls.clear()
    only = test_fastblocks.check_schedule(fused_gemms=True, modes=(False,), stacks=("context_refiner",))
    errors["SwiGLU epilogue only"] = only["context_refiner fp8=False"]
    errors["SwiGLU epilogue only: calls"] = (
        calls.count("qkv_norm_rope") + abs(calls.count("swiglu") - len(prepared(False).context_refiner)), 0)
    return errors


@needs_triton
@pytest.mark.parametrize("check", ["check_kernels", "check_schedule"])
def test_fused_gemms_interpreted(check):
    errors = interpreted(check, __file__)
    assert errors
    for name, (error, bound) in errors.items():
        assert error <= bound, (name, error, bound)


def test_the_switch_reaches_the_schedule():
    from zimage import fused_gemm, speed

    # On, for the GEMM measured faster end to end (H100, 2026-12-07): the SwiGLU one; not the q/k/v ones.
    assert speed.Switches().fused_gemms
    assert not speed.Switches.parse("-fused_gemms").fused_gemms
    assert [name for name in fused_gemm.CONFIG if fused_gemm.enabled(name)] == ["swiglu_gemm"]


if __name__ == "__main__":  # interpreted(): one check in this process, its errors as the last line of stdout
    print(json.dumps(globals()[sys.argv[1]]()))
