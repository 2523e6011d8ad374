"""The compiled engine on CPU (tiny model): warm-up must leave nothing for a user's first request to compile."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from tests.helpers import generate
from zimage.request import GenerationRequest


def test_after_warm_up_user_requests_compile_nothing(tiny_settings):
    from zimage.engine import Engine

    engine = Engine(tiny_settings.replace(compile="on"))
    engine.load()
    assert engine.describe()["compiled"]
    torch._dynamo.reset()
    counters.clear()
    report = engine.warm_up([("Draft", "1:1", 2), ("Standard", "1:1", 2)])
    assert [entry["steps"] for entry in report] == [2, 2]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    # Full step counts, prompt lengths warm-up never used, both sizes: served by what warm-up compiled.
    for preset, prompt in (("Standard", "a red circle"), ("Draft", " ".join(["a blue star"] * 40))):
        result = generate(engine, GenerationRequest(prompt, preset=preset, seed=1))
        assert result.steps == (8 if preset == "Standard" else 6)
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["recompiles"])
    torch._dynamo.reset()
