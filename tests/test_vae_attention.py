"""zimage::gemm_attention and its VAE processor (zimage/vae_attention.py) against SDPA and diffusers' processor,
on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zimage import tiny, vae_attention


def rel_l2(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def qkv(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * 1.5).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape,chunk", [((1, 1, 300, 64), 0), ((1, 1, 300, 600), 128), ((2, 3, 130, 40), 48)])
def test_op_matches_sdpa(dtype, bound, shape, chunk):
    """One chunk, and chunks that do not divide S (the last one short), one or several (batch, head) pairs, a head dim
    above 256: SDPA's result (float32, on the same rounded inputs), in v's dtype."""
    q, k, v = qkv(shape, dtype)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    got = torch.ops.zimage.gemm_attention(q, k, v, chunk)
    assert got.dtype == dtype and got.shape == shape
    assert rel_l2(got, expected) < bound


def test_chunk_from_budget(monkeypatch):
    """The default chunk comes from CHUNK_BYTES: 4096 queries at S = 16384 (256 MiB of float32 scores); a small
    budget gives several chunks on a small shape, the same result."""
    assert vae_attention.chunk_rows(1, 16384) == 4096
    q, k, v = qkv((1, 1, 200, 32))
    whole = torch.ops.zimage.gemm_attention(q, k, v)
    monkeypatch.setattr(vae_attention, "CHUNK_BYTES", 4 * 200 * 70)
    assert vae_attention.chunk_rows(1, 200) == 70
    assert rel_l2(torch.ops.zimage.gemm_attention(q, k, v), whole) < 1e-6


def test_op_under_compile():
    """Compiled (shape-generic), the op stays opaque -- Inductor calls it rather than a fused or SDPA rewrite -- and
    gives the eager result."""
    from torch._inductor.utils import run_and_get_code

    def f(q, k, v):
        return torch.ops.zimage.gemm_attention(q * 2, k, v) + 1

    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    for s in (48, 80):
        q, k, v = qkv((1, 1, s, 32), seed=s)
        got, code = run_and_get_code(compiled, q, k, v)
        assert rel_l2(got, f(q, k, v)) < 1e-6
    assert "gemm_attention" in "\n".join(code) and "scaled_dot_product" not in "\n".join(code)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**{**tiny.VAE, "sample_size": 64}).eval()


def test_tiny_vae_decodes_the_same(monkeypatch):
    """The tiny VAE's mid-block attention (one head of 32) with the processor installed: the same pixels as
    diffusers' AttnProcessor2_0, through the op (in chunks of 100 of its 480 queries)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    vae = tiny_vae()
    latents = torch.randn(1, 16, 24, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vae.decode(latents).sample
    assert vae_attention.install(vae, min_head_dim=32) == 1
    calls = []
    scores = vae_attention._scores
    monkeypatch.setattr(vae_attention, "_scores", lambda *a: calls.append(1) or scores(*a))
    monkeypatch.setattr(vae_attention, "CHUNK_BYTES", 4 * 480 * 100)
    with torch.no_grad():
        got = vae.decode(latents).sample
    assert len(calls) == 5
    assert rel_l2(got, expected) < 1e-5
    vae_attention.uninstall(vae)
    assert all(type(a.processor) is AttnProcessor2_0 for a in vae_attention._attentions(vae))


def test_processor_compiles_and_falls_back_to_sdpa_with_a_mask():
    """The processor traces in one graph (the decoder is compiled) and matches AttnProcessor2_0; with a mask it is
    SDPA as before."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(48, heads=1, dim_head=48, norm_num_groups=8, residual_connection=True, bias=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True).eval()
    x = torch.randn(1, 48, 6, 10)
    tokens = torch.randn(2, 30, 48)
    mask = torch.randint(0, 2, (2, 30)).bool()
    mask[:, 0] = True
    with torch.no_grad():
        expected = attn(x)
        expected_masked = attn(tokens, attention_mask=mask)
        attn.set_processor(vae_attention.GemmAttnProcessor())
        assert rel_l2(torch.compile(attn, dynamic=True, fullgraph=True)(x), expected) < 1e-5
        assert torch.equal(attn(tokens, attention_mask=mask), expected_masked)
    assert type(AttnProcessor2_0()) is not vae_attention.GemmAttnProcessor


def test_install_skips_small_heads():
    """The default threshold (head dim > 256, what SDPA cannot send to flash/cuDNN) leaves the tiny VAE alone;
    uninstall restores diffusers' processor class."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    vae = tiny_vae()
    assert vae_attention.install(vae) == 0
    assert all(type(a.processor) is AttnProcessor2_0 for a in vae_attention._attentions(vae))
    assert vae_attention.install(vae, min_head_dim=33) == 0
    assert vae_attention.install(vae, min_head_dim=32) == 1
    assert type(vae_attention._attentions(vae)[0].processor) is vae_attention.GemmAttnProcessor
    vae_attention.uninstall(vae)
    assert type(vae_attention._attentions(vae)[0].processor) is AttnProcessor2_0
