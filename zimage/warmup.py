"""Warm-up: one generation per shape the service will serve, before it reports ready, so that
torch.compile, autotuning and allocator growth happen before the first user waits on them.

In process, `Engine.warm_up()` runs `requests(shapes_to_warm(...))`. Against a running server, through its
HTTP API, `warm_remote()` (the CLI is the repository's `warmup.py`).
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request

from .presets import TIERS
from .request import GenerationRequest

PROMPT = "warm-up: a red circle on a blue background, 一个蓝色背景上的红色圆形"
# Prompts of two lengths, taken in turn: the compiled text encoder and transformer then see a second caption
# length during warm-up and switch to shape-generic code there, not on a user's first longer prompt.
PROMPTS = (PROMPT, " ".join([PROMPT] * 6))

Shape = tuple[str, str, "int | None"]  # (tier, aspect, steps or None for the tier's)


WARM_STEPS = 2  # compiling needs one pass through each stage per shape, not the tier's 6-8 steps
# torch.compile's time by phase, from Dynamo's own counters (label, counter): where a restart's warm-up goes.
COMPILE_PHASES = (("total", "_compile.compile_inner"), ("dynamo tracing", "bytecode_tracing"),
                  ("guards", "build_guards"), ("backend", "OutputGraph.call_user_compiler"),
                  ("inductor codegen", "fx_codegen_and_compile"), ("cache hits", "AOTAutogradCache.inductor_load"),
                  ("module load", "PyCodeCache.load_by_key_path"), ("kernel compile wait", "async_compile.wait"))


def compile_seconds(detail_over: float | None = None) -> dict[str, float]:
    """Seconds torch.compile has spent in this process so far, by phase (empty if it never ran). `detail_over`:
    also every other timed step of Dynamo's that took longer than that many seconds, under its own name."""
    import torch._dynamo.utils

    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    spent = dict(zip(names, (float(v) for v in values)))
    out = {label: round(spent[key], 2) for label, key in COMPILE_PHASES if key in spent}
    if detail_over is not None:
        known = {key for _, key in COMPILE_PHASES}
        out.update({name: round(v, 2) for name, v in spent.items() if name not in known and v > detail_over})
    return out


def shapes_to_warm(compiled: bool) -> list[Shape]:
    """Compiled: every tier at 1:1 (each size is traced, autotuned and allocated once), 2 steps each. Eager:
    one short Draft run proves the whole path works; there is nothing to compile."""
    if compiled:
        return [(tier, "1:1", WARM_STEPS) for tier in TIERS]
    return [("Draft", "1:1", 1)]


def requests(shapes: list[Shape]) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=PROMPTS[i % 2], preset=tier, aspect=aspect, steps=steps, seed=0)
            for i, (tier, aspect, steps) in enumerate(shapes)]


def warm_remote(url: str, presets: list[str], auth: str | None = None, timeout: float = 900) -> list[dict]:
    """POST one generation per preset to a running server's /v1/images/generations."""
    report = []
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    for preset in presets:
        body = json.dumps({"prompt": PROMPT, "quality": preset, "n": 1, "seed": 0, "output_format": "jpeg"}).encode()
        req = urllib.request.Request(url.rstrip("/") + "/v1/images/generations", body, headers)
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        report.append({"preset": preset, "status": status, "seconds": round(time.perf_counter() - t0, 3)})
    return report
