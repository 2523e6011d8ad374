"""VRAM tiers under a per-process memory cap: a stream of requests must never surface an OOM, and memory must
come back to the post-warm-up baseline after every request.

    python bench/vram.py --profile 16gb --limit 16 --requests Standard:30,High:5,Ultra:2 --out vram-16gb.json

Also reports which profile `auto` would choose under caps of the whole card, 24, 16 and 12 GiB. Each request
uses a different prompt, so the text encoder runs every time (no embedding-cache shortcut).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.latency import PROMPT  # noqa: E402
from zimage import memory, speed  # noqa: E402
from zimage.engine import Engine  # noqa: E402
from zimage.request import EngineError, GenerationRequest  # noqa: E402
from zimage.settings import Settings  # noqa: E402
from zimage.units import GIB  # noqa: E402



def auto_choices(device: str, fp8: bool) -> dict:
    """The profile `auto` picks at each cap (no allocation happens here, so caps can be changed freely)."""
    choices = {}
    for limit in (0, 24, 16, 12):
        memory.apply_memory_limit(device, limit if limit else 1e9)
        usable = memory.usable_gib(device)
        choices[f"{limit or 'card'}"] = {"usable_gib": round(usable, 1),
                                         "profile": memory.choose_profile("auto", usable, fp8)}
    memory.apply_memory_limit(device, 1e9)  # back to the whole card; the engine applies its own limit
    return choices


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random-full")
    ap.add_argument("--profile", default="16gb")
    ap.add_argument("--limit", type=float, default=16.0, help="GiB cap (set_per_process_memory_fraction)")
    ap.add_argument("--fp8", default="auto")
    ap.add_argument("--compile", default="off")
    ap.add_argument("--requests", default="Standard:30,High:5,Ultra:2")
    ap.add_argument("--cache-dir", default="/tmp/zimage-bench-cache")
    ap.add_argument("--out", default="vram.json")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "profile": args.profile,
                    "limit_gib": args.limit, "fp8": args.fp8, "compile": args.compile}
    if device == "cuda":
        report["auto_choice"] = auto_choices(device, speed.fp8_wanted(args.fp8, device, torch.bfloat16))
    settings = Settings(model=args.model, memory_profile=args.profile, gpu_memory_limit=args.limit, fp8=args.fp8,
                        compile=args.compile, cache_dir=Path(args.cache_dir))
    t0 = time.perf_counter()
    engine = Engine(settings)
    engine.load()
    report["load_s"] = round(time.perf_counter() - t0, 1)
    report["engine"] = engine.describe()
    report["warmup"] = engine.warm_up()
    memory.release_memory(engine.device)
    baseline = torch.cuda.memory_reserved() if device == "cuda" else 0
    report["baseline_reserved_gib"] = round(baseline / GIB, 3)

    plan = [(tier, int(count)) for tier, count in (item.split(":") for item in args.requests.split(","))]
    rows, errors = [], []
    i = 0
    for tier, count in plan:
        for _ in range(count):
            i += 1
            request = GenerationRequest(f"{PROMPT} #{i}", preset=tier, seed=i)
            t = time.perf_counter()
            try:
                result = engine.generate(engine.resolve(request))
            except EngineError as exc:  # what a caller would see
                errors.append({"request": i, "tier": tier, "error": f"{type(exc).__name__}: {exc}"})
                continue
            reserved = torch.cuda.memory_reserved() if device == "cuda" else 0
            rows.append({"request": i, "tier": tier, "seconds": round(time.perf_counter() - t, 3),
                         "peak_gib": round((result.peak_vram_bytes or 0) / GIB, 2),
                         "reserved_after_gib": round(reserved / GIB, 3), "oom_retries": result.oom_retries,
                         "timings": result.timings})
    deviation = max((abs(r["reserved_after_gib"] * GIB - baseline) / baseline for r in rows), default=0.0) \
        if baseline else 0.0
    report.update({
        "requests": rows, "errors_reaching_caller": errors, "oom_handled": engine.stats.oom["handled"],
        "oom_failed": engine.stats.oom["failed"], "max_reserved_deviation_pct": round(100 * deviation, 2),
        "by_tier": {tier: {"n": sum(r["tier"] == tier for r in rows),
                           "median_s": round(statistics.median([r["seconds"] for r in rows if r["tier"] == tier]), 3),
                           "max_peak_gib": max(r["peak_gib"] for r in rows if r["tier"] == tier)}
                    for tier, _ in plan if any(r["tier"] == tier for r in rows)},
    })
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"profile {args.profile} under {args.limit} GiB ({report['engine']['memory_profile']}, fp8 "
          f"{report['engine']['fp8']}): load {report['load_s']} s, baseline reserved "
          f"{report['baseline_reserved_gib']} GiB, errors reaching caller {len(errors)}, OOM handled "
          f"{report['oom_handled']}, max reserved deviation {report['max_reserved_deviation_pct']} %")
    for tier, s in report["by_tier"].items():
        print(f"  {tier:<9} n={s['n']:>3} median {s['median_s']:.2f} s  peak {s['max_peak_gib']:.2f} GiB")
    if "auto_choice" in report:
        print("  auto would choose:", json.dumps(report["auto_choice"]))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
