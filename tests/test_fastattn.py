"""Real-valued RoPE processor (zimage/fastattn.py) against diffusers' own complex-RoPE processor, on CPU.

Tolerances: float32 -- the same float32 arithmetic in another order, so rel-L2 <= 1e-6 over the whole
transformer (measured 0.0 on this CPU: the products and sums are the same); bf16 -- RoPE runs in float32 in
both and rounds to bf16 once, so outputs agree to bf16 rounding: rel-L2 <= 1e-2 (the compiled-vs-eager
quality bound in tests/test_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

from zimage import fastattn, tiny


def small_transformer(dtype=torch.float32, **overrides):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    config = {**tiny.TRANSFORMER, **overrides}
    model = ZImageTransformer2DModel(**config).eval()
    with torch.no_grad():  # the tiny recipe's init is near-identity; random weights exercise every path
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) * 0.05)
    return model.to(dtype)


def inputs(dtype, cap_lens=(37,), size=(32, 48)):
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(16, 1, *size, generator=g).to(dtype) for _ in cap_lens]
    cap = [torch.randn(n, tiny.TRANSFORMER["cap_feat_dim"], generator=g).to(dtype) for n in cap_lens]
    return x, torch.tensor([0.3] * len(cap_lens)), cap


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run(model, x, t, cap):
    with torch.no_grad():
        return torch.stack([o.float() for o in model(x, t, cap, return_dict=False)[0]])


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_real_rope_matches_diffusers(dtype, bound):
    model = small_transformer(dtype)
    x, t, cap = inputs(dtype)
    reference = run(model, x, t, cap)
    calls = []
    original_apply = fastattn.apply_rope_real

    def counting(*args):
        calls.append(1)
        return original_apply(*args)

    assert fastattn.install(model) == len(model.noise_refiner) + len(model.context_refiner) + len(model.layers)
    fastattn.apply_rope_real, saved = counting, fastattn.apply_rope_real
    try:
        out = run(model, x, t, cap)
    finally:
        fastattn.apply_rope_real = saved
    assert calls, "the project processor was not used"
    assert torch.isfinite(out).all()
    assert rel_l2(out, reference) <= bound
    fastattn.uninstall(model)
    assert rel_l2(run(model, x, t, cap), reference) == 0.0


def test_real_rope_batched_prompts_with_mask():
    """Two prompts of different lengths: padded batch with an attention mask (the SDPA fallback path)."""
    model = small_transformer()
    x, t, cap = inputs(torch.float32, cap_lens=(20, 45))
    reference = run(model, x, t, cap)
    fastattn.install(model)
    assert rel_l2(run(model, x, t, cap), reference) <= 1e-6


def test_rope_table_is_real_and_matches_complex():
    model = small_transformer()
    ids = torch.tensor([[0, 0, 0], [5, 3, 7], [40, 11, 2]])
    complex_table = model.rope_embedder(ids)
    fastattn.install(model)
    real_table = model.rope_embedder(ids)
    assert real_table.dtype == torch.float32 and real_table.shape == complex_table.shape + (2,)
    assert torch.equal(torch.view_as_real(complex_table), real_table)


def test_apply_rope_real_equals_complex_multiply():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, 3, 16, generator=g)
    angles = torch.randn(2, 11, 8, generator=g)
    freqs = torch.polar(torch.ones_like(angles), angles)
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 11, 3, 8, 2)) * freqs.unsqueeze(2)).flatten(3)
    assert torch.allclose(fastattn.apply_rope_real(x, torch.view_as_real(freqs)), expected, atol=1e-6)


def test_fa4_op_traces_with_fake_tensors():
    """The custom op has a fake kernel, so torch.compile/export can trace it without flash-attn-4 installed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 77, 3, 32, dtype=torch.bfloat16)
        v = torch.empty(1, 77, 3, 32, dtype=torch.bfloat16)
        out = torch.ops.zimage.fa4_attention(q, q, v, 0.1)
    assert out.shape == (1, 77, 3, 32) and out.dtype == torch.bfloat16


def test_fa4_processor_routes_to_the_op(monkeypatch):
    """With use_fa4 the processor calls zimage::fa4_attention on BSHD tensors; here a CPU kernel stands in
    for flash-attn-4 (SDPA), so the whole model must match diffusers' output."""
    lib = torch.library.Library("zimage", "IMPL")  # noqa: F841 - keeps the registration alive for the test
    seen = []

    def cpu_kernel(q, k, v, scale):
        seen.append(q.shape)
        return fastattn.sdpa_reference(q, k, v, scale)

    lib.impl("fa4_attention", cpu_kernel, "CPU")
    model = small_transformer()
    x, t, cap = inputs(torch.float32)
    reference = run(model, x, t, cap)
    fastattn.install(model, use_fa4=True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True), raising=False)
    out = run(model, x, t, cap)
    monkeypatch.undo()
    assert seen and all(len(s) == 4 for s in seen)  # (B, S, H, D)
    assert rel_l2(out, reference) <= 1e-5
