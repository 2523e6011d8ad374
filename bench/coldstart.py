"""Cold start: `python app.py` start -> /readyz 200, first with an empty compile cache, then with a warm one.

    python bench/coldstart.py --model-dir /tmp/random-full --cache-dir /tmp/zimage-cache \
        --runs cold,warm --out coldstart.json --log-dir logs -- --fp8 off

If --model-dir holds no model, the full-size random model (--model random-full) is saved there first with
save_pretrained, so the app loads it from local disk like real weights. Each run is a fresh app process
(zimage/appprocess.py's AppProcess) on the same --cache-dir, where the settings put the persistent Inductor
cache; `cold` empties it first. Times: process start -> /healthz answers (server up), -> /readyz 200 (model
loaded, compiled, warm-up done). Flags after `--` go to app.py; each run's log is left in --log-dir.
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zimage.appprocess import AppProcess  # noqa: E402


def save_random_full(folder: Path) -> float:
    import torch

    from zimage.loading import build_random_full

    t0 = time.perf_counter()
    pipe = build_random_full("cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    del pipe
    torch.cuda.empty_cache()
    return time.perf_counter() - t0


def phases_from_log(text: str) -> dict:
    """Where a start went, from the app's own log lines: the engine's loading phases ("engine loaded (seconds:
    {...})"), each warm-up shape's seconds ("warm-up Draft 1:1 768x768: 26.67s") and torch.compile's time by phase
    ("warm-up compile time by phase (s): {...}"). Missing lines leave their keys out."""
    out: dict = {}
    loaded = re.search(r"engine loaded \(seconds: (\{[^}]*\})\)", text)
    if loaded:
        out["loading_s"] = ast.literal_eval(loaded.group(1))
    shapes = re.findall(r"warm-up (\w+ \d+:\d+ \d+x\d+(?: \(LoRA branch\))?): ([\d.]+)s", text)
    if shapes:
        out["warm_up_s"] = {shape: float(seconds) for shape, seconds in shapes}
    compiled = re.search(r"warm-up compile time by phase \(s\): (\{[^}]*\})", text)
    if compiled:
        out["compile_s"] = ast.literal_eval(compiled.group(1))
    return out


def start_once(args, label: str) -> dict:
    if label == "cold":
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    elif label == "stale":  # warm Inductor cache, but the saved compile artifacts are corrupt (must be ignored)
        for blob in args.cache_dir.glob("compiled/*/artifacts-*.bin"):
            blob.write_bytes(blob.read_bytes()[:-7])
    app = AppProcess(args.log_dir, args.cache_dir, "--model", args.model or str(args.model_dir), *args.app_args)
    app.start()
    try:
        app.wait_ready(timeout=args.timeout)
        ready = time.monotonic() - app.started_at
    except TimeoutError:
        ready = None
    finally:
        app.stop()  # our own child, by its pid
    return {"run": label, "server_up_s": None if app.up_after is None else round(app.up_after, 1),
            "ready_s": None if ready is None else round(ready, 1), "timed_out": ready is None,
            "log": str(app.log_path), **phases_from_log(app.log())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--model", default=None, help="a model id for app.py instead of --model-dir (e.g. random-full, "
                    "built in the app process: no 20 GB save, no page cache in the way)")
    ap.add_argument("--cache-dir", type=Path, required=True)
    ap.add_argument("--runs", default="cold,warm",
                    help="comma-separated: cold (empty the cache first), warm, or stale (truncate saved artifacts)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=Path("coldstart.json"))
    ap.add_argument("--log-dir", type=Path, default=Path("."), help="where each run's app log is left")
    ap.add_argument("app_args", nargs="*", help="after --: flags for app.py")
    args = ap.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    report = {"app_args": args.app_args, "runs": []}
    if args.model is None and not (args.model_dir / "model_index.json").is_file():
        report["saved_random_full_s"] = round(save_random_full(args.model_dir), 1)
        print(f"saved random-full to {args.model_dir} in {report['saved_random_full_s']} s", flush=True)
    for label in args.runs.split(","):
        report["runs"].append(start_once(args, label))
        print(json.dumps(report["runs"][-1]), flush=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| run | server up | ready (/readyz 200) |\n|---|---|---|")
    for r in report["runs"]:
        print(f"| {r['run']} cache | {r['server_up_s']} s | {r['ready_s'] if not r['timed_out'] else 'timed out'} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
