"""fp8 weights as plain tensors (zimage/fp8.py): the arithmetic, dtype safety, one compiled graph for repeated
blocks, and the engine generating with them. `torch._scaled_mm` runs on CPU too, so all of it runs here."""

from __future__ import annotations

import numpy
import torch
from torch._dynamo.utils import counters

from tests.helpers import generate
from zimage import fp8, speed
from zimage.request import GenerationRequest


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_linear_is_the_dequantized_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512)
    q = fp8.Fp8Linear.from_linear(linear)
    assert q.weight.dtype == fp8.E4M3 and q.weight_scale.shape == (1, 512)
    x = torch.randn(3, 7, 256)
    xq, xs = fp8.quantize_rows(x.reshape(-1, 256))
    reference = (xq.float() * xs) @ (q.weight.float() * q.weight_scale.reshape(-1, 1)).t() + linear.bias
    out = q(x)
    assert out.shape == (3, 7, 512) and out.dtype == torch.float32
    assert rel(out.reshape(-1, 512), reference) < 1e-5
    # e4m3 keeps 3 mantissa bits: a few percent against the unquantized layer, never more.
    assert rel(out, linear(x)) < 0.05
    assert rel(q(x.bfloat16()), linear(x)) < 0.05 and q(x.bfloat16()).dtype == torch.bfloat16


def test_zero_rows_and_large_values_stay_finite():
    linear = torch.nn.Linear(32, 16)
    q = fp8.Fp8Linear.from_linear(linear)
    x = torch.zeros(4, 32)
    x[1] = 1e4
    out = q(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], linear.bias, atol=1e-6)


def test_dtype_casts_keep_the_fp8_storage():
    """`module.to(torch.bfloat16)` (from_pipe, LoRA loaders) must not undo the quantization."""
    q = fp8.Fp8Linear.from_linear(torch.nn.Linear(32, 32))
    q.to(torch.bfloat16)
    assert q.weight.dtype == fp8.E4M3 and q.weight_scale.dtype == torch.float32
    assert q.bias.dtype == torch.float32  # cast per call to the activation's dtype


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.adaLN = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64), torch.nn.Linear(64, 64)
        self.odd = torch.nn.Linear(64, 60)  # not a multiple of 16: _scaled_mm cannot take it

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x))) + self.adaLN(x)


def test_quantize_module_skips_excluded_and_unaligned():
    blocks = torch.nn.ModuleList([Block() for _ in range(3)])
    assert fp8.quantize_module(blocks, excluded=("adaLN",)) == 6
    assert fp8.has_fp8(blocks) and speed.has_fp8_weights(blocks)
    assert isinstance(blocks[0].adaLN, torch.nn.Linear) and isinstance(blocks[0].odd, torch.nn.Linear)
    assert isinstance(blocks[2].down, fp8.Fp8Linear)


def test_repeated_fp8_blocks_share_one_compiled_graph():
    """torchao's tensor subclasses made each block its own compile on the H100; plain tensors must not."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([Block() for _ in range(4)])
    fp8.quantize_module(blocks)
    blocks.to(torch.bfloat16)
    x = torch.randn(2, 10, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = x
        for block in blocks:
            eager = block(eager)
        torch._dynamo.reset()
        counters.clear()
        for block in blocks:
            block.compile(dynamic=True, fullgraph=True)
        out = x
        for block in blocks:
            out = block(out)
        longer = torch.randn(2, 33, 64, dtype=torch.bfloat16)
        for block in blocks:
            longer = block(longer)
    assert counters["stats"]["unique_graphs"] == 1
    # Inductor's fused quantization rounds a few activations to the neighbouring e4m3 value: same size of error
    # as the quantization itself (about 3 % per layer here), never more.
    assert rel(out, eager) < 5e-2
    torch._dynamo.reset()


def test_engine_generates_with_fp8_weights(make_engine, monkeypatch):
    """The engine's own fp8 path (placement quantizes before compile) on the tiny model in bf16, with the GPU
    capability check answered yes: finite pixels close to the bf16 engine's."""
    request = GenerationRequest(prompt="a red circle on a blue background", preset="Draft", seed=3)
    plain = generate(make_engine(dtype="bf16", fp8="off"), request)
    monkeypatch.setattr(speed, "fp8_supported", lambda device: True)
    engine = make_engine(dtype="bf16", fp8="on")
    assert engine.describe()["fp8"] is True and fp8.has_fp8(engine.pipeline.transformer)
    result = generate(engine, request)
    a = torch.tensor(numpy.asarray(result.images[0]), dtype=torch.float32)
    b = torch.tensor(numpy.asarray(plain.images[0]), dtype=torch.float32)
    assert torch.isfinite(a).all()
    difference = (a - b).abs().mean().item()
    print(f"mean abs pixel difference fp8 vs bf16: {difference:.2f} / 255")
    assert 0 < difference < 8.0


def test_quantizing_holds_one_unquantized_layer_at_a_time(monkeypatch):
    """On a 12/16 GiB card the bf16 copy of the model must never be resident in full: each Linear's bf16 weight
    is dropped as soon as its fp8 replacement exists (H100 with a 16 GiB cap, 2026-11-24: a list of every
    original Linear kept them all alive, and placement ran out of memory)."""
    import weakref

    blocks = torch.nn.ModuleList([Block() for _ in range(4)])
    originals = [weakref.ref(m) for m in blocks.modules() if isinstance(m, torch.nn.Linear)]
    alive_at_each_step = []
    from_linear = fp8.Fp8Linear.from_linear.__func__

    def counting(cls, linear):
        alive_at_each_step.append(sum(ref() is not None for ref in originals))
        return from_linear(cls, linear)

    monkeypatch.setattr(fp8.Fp8Linear, "from_linear", classmethod(counting))
    assert fp8.quantize_module(blocks) == 12
    # all not-yet-quantized layers are alive by necessity (they are in the model); already replaced ones are not
    total = len(originals)
    assert [total - alive for alive in alive_at_each_step] == list(range(len(alive_at_each_step)))
