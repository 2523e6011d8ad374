"""Warm the service before it reports ready: one generation per shape it will serve, so that torch.compile,
autotuning and allocator growth happen before the first user waits on them.

In process (the app calls this at start-up):
    from warmup import warm_up; warm_up(engine)

Against a running server, through its HTTP API:
    python warmup.py --url http://127.0.0.1:7860 [--auth user:password] [--presets Draft,Standard]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import time
import urllib.error
import urllib.request

from zimage.presets import TIERS
from zimage.request import GenerationRequest

log = logging.getLogger("zimage.warmup")
WARMUP_PROMPT = "warm-up: a red circle on a blue background, 一个蓝色背景上的红色圆形"
# Prompts of two lengths, taken in turn: the compiled text encoder and transformer then see a second caption
# length during warm-up and switch to shape-generic code there, not on a user's first longer prompt.
WARMUP_PROMPTS = (WARMUP_PROMPT, " ".join([WARMUP_PROMPT] * 6))


def warm_shapes(engine) -> list[tuple[str, str, int | None]]:
    """(tier, aspect, steps) to run. Compiled: every tier at 1:1 (compile specialises on sequence length).
    Eager: one short Draft run proves the whole path works; there is nothing to compile."""
    if engine.compiled:
        return [(tier, "1:1", None) for tier in TIERS]
    return [("Draft", "1:1", 1)]


def warm_up(engine, shapes: list[tuple[str, str, int | None]] | None = None) -> list[dict]:
    """Run the warm-up generations, mark the engine ready, and return seconds per shape."""
    report = []
    for i, (tier, aspect, steps) in enumerate(shapes if shapes is not None else warm_shapes(engine)):
        t0 = time.perf_counter()
        request = GenerationRequest(prompt=WARMUP_PROMPTS[i % 2], preset=tier, aspect=aspect, steps=steps, seed=0)
        result = engine.generate(request, allow_warming=True)
        entry = {"preset": tier, "aspect": aspect, "width": result.width, "height": result.height,
                 "steps": result.steps, "seconds": round(time.perf_counter() - t0, 3)}
        report.append(entry)
        log.info("warm-up %s %s %dx%d: %.2fs", tier, aspect, result.width, result.height, entry["seconds"])
    engine.mark_ready(report)
    return report


def warm_remote(url: str, presets: list[str], auth: str | None = None, timeout: float = 900) -> list[dict]:
    """POST one generation per preset to a running server's /v1/images/generations."""
    report = []
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    for preset in presets:
        body = json.dumps({"prompt": WARMUP_PROMPT, "quality": preset, "n": 1, "seed": 0,
                           "output_format": "jpeg"}).encode()
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Warm a running Z-Image server through its HTTP API.")
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--presets", default=",".join(TIERS), help="comma-separated quality presets")
    parser.add_argument("--auth", default=None, help="user:password if the server has auth on")
    args = parser.parse_args(argv)
    report = warm_remote(args.url, [p.strip() for p in args.presets.split(",") if p.strip()], args.auth)
    print(f"{'preset':<10} {'status':>6} {'seconds':>8}")
    for row in report:
        print(f"{row['preset']:<10} {row['status']:>6} {row['seconds']:>8.2f}")
    return 0 if all(r["status"] == 200 for r in report) else 1


if __name__ == "__main__":
    sys.exit(main())
