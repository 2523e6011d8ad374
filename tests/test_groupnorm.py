"""SplitGroupNorm (zimage/groupnorm.py): the compiled two-step statistics against aten's GroupNorm, on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zimage import groupnorm


def rel_l2(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def norm_module(channels: int, groups: int = 32) -> torch.nn.GroupNorm:
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels) * 0.5 + 1)
        norm.bias.copy_(torch.randn(channels) * 0.1)
    return norm


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(1, 64, 24, 40), (2, 128, 17, 9)])
def test_split_form_matches_aten(dtype, bound, shape):
    """Channels-last input (the decoder's layout), an offset mean, several groups per image: the two-step sums give
    aten's statistics. The split form is what compiled code runs; called directly here."""
    norm = norm_module(shape[1]).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype).contiguous(memory_format=torch.channels_last)
    expected = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    got = groupnorm.split_group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    assert got.dtype == dtype and got.shape == x.shape
    assert rel_l2(got, expected) <= bound


def test_compiled_module_matches_and_eager_is_aten(monkeypatch):
    """install swaps the class; eagerly the module is exactly aten's GroupNorm, compiled (shape-generic, two sizes)
    it runs the split form (traced) and matches it; uninstall restores nn.GroupNorm."""
    traced = []
    split = groupnorm.split_group_norm
    monkeypatch.setattr(groupnorm, "split_group_norm", lambda *a: traced.append(1) or split(*a))
    block = torch.nn.Sequential(norm_module(64), torch.nn.SiLU(), torch.nn.Conv2d(64, 64, 3, padding=1),
                                norm_module(64), torch.nn.SiLU()).eval()
    block = block.to(memory_format=torch.channels_last)
    xs = [torch.randn(1, 64, h, w).contiguous(memory_format=torch.channels_last) for h, w in ((16, 24), (20, 12))]
    with torch.no_grad():
        expected = [block(x) for x in xs]
        assert groupnorm.install(block) == 2
        assert type(block[0]) is groupnorm.SplitGroupNorm
        assert all(torch.equal(block(x), e) for x, e in zip(xs, expected))  # eager: aten's kernel
        assert not traced
        compiled = torch.compile(block, dynamic=True, fullgraph=True)
        for x, e in zip(xs, expected):
            assert rel_l2(compiled(x), e) <= 1e-5
        assert traced
    groupnorm.uninstall(block)
    assert type(block[0]) is torch.nn.GroupNorm
