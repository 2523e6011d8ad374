"""Cold start: `python app.py` start -> /readyz 200, first with an empty compile cache, then with a warm one.

    python bench/coldstart.py --model-dir /tmp/random-full --cache-dir /tmp/zimage-cache \
        --runs cold,warm --out coldstart.json -- --fp8 off

If --model-dir holds no model, the full-size random model (--model random-full) is saved there first with
save_pretrained, so the app loads it from local disk like real weights. Each run is a fresh app process on
the same --cache-dir (where the settings put the persistent Inductor cache); `cold` empties it first. Times:
process start -> /healthz answers (server up), -> /readyz 200 (model loaded, compiled, warm-up done). Flags
after `--` go to app.py. The app's log goes to --log. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(args, label: str, log) -> dict:
    if label == "cold":
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(ROOT / "app.py"), "--model", str(args.model_dir), "--cache-dir", str(args.cache_dir),
           "--host", "127.0.0.1", "--port", str(port), *args.app_args]
    log.write(f"\n=== {label}: {' '.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    up = ready = None
    try:
        while time.perf_counter() - t0 < args.timeout:
            if proc.poll() is not None:
                raise SystemExit(f"{label}: app exited with {proc.returncode}; see {args.log}")
            if up is None and status(base + "/healthz") is not None:
                up = time.perf_counter() - t0
            if status(base + "/readyz") == 200:
                ready = time.perf_counter() - t0
                break
            time.sleep(0.2)
    finally:
        proc.terminate()  # our own child, by its pid
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"run": label, "server_up_s": None if up is None else round(up, 1),
            "ready_s": None if ready is None else round(ready, 1), "timed_out": ready is None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--cache-dir", type=Path, required=True)
    ap.add_argument("--runs", default="cold,warm", help="comma-separated: cold (empty the cache first) or warm")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=Path("coldstart.json"))
    ap.add_argument("--log", type=Path, default=Path("coldstart-app.log"))
    ap.add_argument("app_args", nargs="*", help="after --: flags for app.py")
    args = ap.parse_args(argv)
    report = {"app_args": args.app_args, "runs": []}
    if not (args.model_dir / "model_index.json").is_file():
        report["saved_random_full_s"] = round(save_random_full(args.model_dir), 1)
        print(f"saved random-full to {args.model_dir} in {report['saved_random_full_s']} s", flush=True)
    with args.log.open("a") as log:
        for label in args.runs.split(","):
            report["runs"].append(start_once(args, label, log))
            print(json.dumps(report["runs"][-1]), flush=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| run | server up | ready (/readyz 200) |\n|---|---|---|")
    for r in report["runs"]:
        print(f"| {r['run']} cache | {r['server_up_s']} s | {r['ready_s'] if not r['timed_out'] else 'timed out'} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
