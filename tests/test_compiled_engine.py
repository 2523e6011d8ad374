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


def test_what_a_request_compiles_is_frozen_so_later_collections_skip_it(tiny_settings, monkeypatch):
    """A request that compiles something warm-up never did (on the GPU: the same-engine A/Bs of bench/latency.py;
    a shape never warmed) leaves long-lived objects; they must be frozen like warm-up's, or every later request's
    gc.collect() walks them (on the H100, 2026-12-07, the per-request cleanup grew from ~2 ms to ~80 ms after such
    a compile). Warm-up covers every shape on the tiny model, so this request compiles a small function itself."""
    import gc

    from zimage.engine import Engine

    engine = Engine(tiny_settings.replace(compile="on"))
    engine.load()
    torch._dynamo.reset()
    counters.clear()
    try:
        engine.warm_up([("Draft", "1:1", 2)])
        generate(engine, GenerationRequest("a red circle", preset="Draft", seed=1))
        settled = len(gc.get_objects())  # what the collector walks once ready
        compiled, run = [], engine.stages.run

        def run_compiling_something_new(job, *args):
            function = torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False)
            function(torch.ones(8))
            compiled.append(function)  # kept, as Dynamo keeps what it compiled
            return run(job, *args)

        monkeypatch.setattr(engine.stages, "run", run_compiling_something_new)
        generate(engine, GenerationRequest("a red circle", preset="Draft", seed=2))
        monkeypatch.setattr(engine.stages, "run", run)
        generate(engine, GenerationRequest("a red circle", preset="Draft", seed=3))
        grown = len(gc.get_objects()) - settled
        assert grown < 500, f"{grown} objects more for every later gc.collect() to walk"
    finally:
        engine.close()
        torch._dynamo.reset()
