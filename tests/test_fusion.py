"""Fused q/k/v and w1/w3 projections (zimage/fusion.py) on CPU: the same outputs as separate GEMMs in float32,
bf16 and fp8; the parts' weights are views of the fused weight, so LoRA merges (written in place) and LoRA
branches reach the fused GEMM; a moved model is caught."""

from __future__ import annotations

import pytest
import torch

from tests.test_fastattn import inputs, rel_l2, run, small_transformer
from zimage import fastattn, fp8, fusion, lora, speed


def prepared(dtype, quantize=False):
    model = small_transformer(dtype)
    if quantize:
        fp8.quantize_module(model, speed.FP8_EXCLUDED)
    fastattn.install(model)
    return model


@pytest.mark.parametrize("dtype,quantize", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_fused_matches_separate(dtype, quantize):
    model = prepared(dtype, quantize)
    x, t, cap = inputs(dtype, cap_lens=(37, 20))  # two prompts of different lengths: the masked path too
    reference = run(model, x, t, cap)
    blocks = len(model.noise_refiner) + len(model.context_refiner) + len(model.layers)
    memory_before = sum(p.numel() * p.element_size() for p in model.parameters())
    assert fusion.install(model) == 2 * blocks  # q/k/v and w1/w3 of every block
    # The weights are not stored twice: the parts hold views of the fused buffers.
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == memory_before
    group = model.layers[0].attention.fused_qkv
    assert group.fp8 == quantize and group.intact()
    assert model.layers[0].attention.to_q.weight.data_ptr() == group.weight.data_ptr()
    calls = []
    project = fusion.FusedLinear.project
    fusion.FusedLinear.project = lambda self, *a: calls.append(1) or project(self, *a)
    try:
        fused = run(model, x, t, cap)
    finally:
        fusion.FusedLinear.project = project
    assert len(calls) == 2 * blocks  # every group ran, once for the batch
    assert rel_l2(fused, reference) <= 1e-6
    fusion.check(model)
    fusion.uninstall(model)
    assert not fusion.fused_groups(model)
    assert rel_l2(run(model, x, t, cap), reference) <= 1e-6


@pytest.mark.parametrize("quantize", [False, True])
def test_lora_merge_and_branch_reach_the_fused_gemm(quantize, tmp_path):
    """Merge mode writes W0 + delta into a part's weight in place: the fused GEMM sees it. Branch mode adds the part's
    branch to its slice. Both equal the unfused model with the same LoRA."""
    dtype = torch.bfloat16
    x, t, cap = inputs(dtype)
    results = {}
    for fused in (False, True):
        for mode in ("merge", "branch"):
            model = prepared(dtype, quantize)
            if fused:
                fusion.install(model)
            runtime = lora.LoraRuntime(lora.LoraLibrary(tmp_path), model, "cpu",
                                       dtype, rank=4, cache_bytes=0, mode=mode)
            g = torch.Generator().manual_seed(5)
            name = "layers.0.attention.to_k"
            w = runtime.wrappers[name]
            adapter = lora.Adapter("a", (0, 0), "0" * 64, "0" * 12, 4,
                                   {name: (torch.randn(4, w.in_features, generator=g).to(dtype) * 0.3,
                                           torch.randn(w.out_features, 4, generator=g).to(dtype) * 0.3),
                                    "layers.1.feed_forward.w3": (
                                        torch.randn(4, runtime.wrappers["layers.1.feed_forward.w3"].in_features,
                                                    generator=g).to(dtype) * 0.3,
                                        torch.randn(runtime.wrappers["layers.1.feed_forward.w3"].out_features, 4,
                                                    generator=g).to(dtype) * 0.3)}, "diffusers")
            plain = run(model, x, t, cap)
            if mode == "merge":
                runtime._merge([(adapter, 1.0)])
            else:
                runtime._write([(adapter, 1.0)])
            with_lora = run(model, x, t, cap)
            assert rel_l2(with_lora, plain) > 1e-3  # the LoRA changes the output
            if fused:
                fusion.check(model)
            results[(fused, mode)] = with_lora
    for mode in ("merge", "branch"):
        assert rel_l2(results[(True, mode)], results[(False, mode)]) <= 1e-6, mode


def test_moving_a_fused_model_is_caught():
    """`.to()` gives every parameter its own storage: the fused GEMM would no longer see the parts' weights."""
    model = prepared(torch.float32)
    fusion.install(model)
    model.to(torch.float64)
    with pytest.raises(RuntimeError, match="lost their shared weights"):
        fusion.check(model)


def test_engine_fuses_only_a_resident_transformer():
    assert speed.fuse_projections(prepared(torch.float32), resident=False) == 0
    assert speed.fuse_projections(prepared(torch.float32), resident=True,
                                  sw=speed.Switches(fused_projections=False)) == 0
    assert speed.fuse_projections(prepared(torch.float32), resident=True) > 0


def test_swiglu_kernel_path_matches_and_respects_lora_branches(tmp_path, monkeypatch):
    """fused_kernels: an fp8 FFN quantizes w2's input in `zimage::swiglu_quant` (on CPU: its PyTorch reference) --
    the same output as the unfused SwiGLU, bit for bit; a LoRA branch on w1 still reaches it; one on w2 (which needs
    w2's bf16 input) takes the ordinary path."""
    from zimage import kernels

    calls = []
    reference = kernels.swiglu_quant_reference
    monkeypatch.setattr(kernels, "swiglu_quant_reference", lambda h: calls.append(1) or reference(h))
    x, t, cap = inputs(torch.bfloat16)
    outputs = {}
    for on in (False, True):
        model = prepared(torch.bfloat16, quantize=True)
        fusion.install(model, swiglu_kernel=on)
        runtime = lora.LoraRuntime(lora.LoraLibrary(tmp_path), model, "cpu", torch.bfloat16, rank=4, cache_bytes=0,
                                   mode="branch")
        outputs[(on, "none")] = run(model, x, t, cap)
        g = torch.Generator().manual_seed(7)
        for layer in ("w1", "w2"):
            name = f"layers.0.feed_forward.{layer}"
            w = runtime.wrappers[name]
            adapter = lora.Adapter(layer, (0, 0), "0" * 64, "0" * 12, 4, {name: (
                torch.randn(4, w.in_features, generator=g).bfloat16() * 0.3,
                torch.randn(w.out_features, 4, generator=g).bfloat16() * 0.3)}, "diffusers")
            runtime._write([(adapter, 1.0)])
            outputs[(on, layer)] = run(model, x, t, cap)
        runtime._write(None)
    assert calls  # the op ran (the kernel path was taken)
    for case in ("none", "w1", "w2"):
        assert torch.equal(outputs[(True, case)], outputs[(False, case)]), case
    assert rel_l2(outputs[(True, "w1")], outputs[(True, "none")]) > 1e-3
