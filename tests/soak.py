"""Soak test: many sequential generations through the JSON API; the app's memory, open files and threads
must stay flat.

    python -m tests.soak --requests 200        # starts its own app (tiny model), loopback only

Every 10 requests it samples the app process (by the pid it started): RSS (/proc/<pid>/status), open file
descriptors (/proc/<pid>/fd), threads, and on a GPU the allocator's reserved bytes (/metrics). The baseline
is the sample after the first 10 requests (allocator pools, caches and thread pools have grown to their
working size by then). Pass: last RSS within 5 % of the baseline, and fds and threads no more than 2 above it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from zimage.appprocess import AppProcess, http
from tests.load import metric_value

RSS_TOLERANCE = 0.05
COUNT_SLACK = 2  # a pool thread or a keep-alive socket may come and go between samples


def sample(pid: int, url: str) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    metrics = http("GET", url + "/metrics", timeout=30)[2].decode()
    return {"rss_bytes": int(fields["VmRSS"].split()[0]) * 1024, "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "gpu_reserved_bytes": metric_value(metrics, "zimage_torch_reserved_bytes")}


def run(url: str, pid: int, requests: int, every: int = 10) -> dict:
    samples, failures = [], []
    t0 = time.monotonic()
    for i in range(1, requests + 1):
        body = json.dumps({"prompt": f"soak {i}: a red circle on a blue background", "seed": i, "size": "256x256",
                           "steps": 2, "output_format": "png"}).encode()
        status, _, payload = http("POST", url + "/v1/images/generations", body, {"Content-Type": "application/json"})
        if status != 200:
            failures.append({"request": i, "status": status, "body": payload[:300].decode(errors="replace")})
        if i % every == 0:
            samples.append({"after_requests": i, **sample(pid, url)})
    base, last = samples[0], samples[-1]
    growth = (last["rss_bytes"] - base["rss_bytes"]) / base["rss_bytes"]
    gpu_growth = None
    if base["gpu_reserved_bytes"]:
        gpu_growth = (last["gpu_reserved_bytes"] - base["gpu_reserved_bytes"]) / base["gpu_reserved_bytes"]
    return {
        "requests": requests, "seconds": round(time.monotonic() - t0, 1), "failures": failures, "samples": samples,
        "rss_growth_pct": round(100 * growth, 2), "gpu_reserved_growth_pct": gpu_growth and round(100 * gpu_growth, 2),
        "fd_growth": last["fds"] - base["fds"], "thread_growth": last["threads"] - base["threads"],
        "passed": (not failures and abs(growth) <= RSS_TOLERANCE and last["fds"] - base["fds"] <= COUNT_SLACK
                   and last["threads"] - base["threads"] <= COUNT_SLACK
                   and (gpu_growth is None or abs(gpu_growth) <= RSS_TOLERANCE)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Soak test against the tiny model (loopback only).")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", default="soak-report.json")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="zimage-soak-"))
    server = AppProcess(tmp, tmp / "cache").start()
    try:
        server.wait_ready(timeout=600)
        report = run(server.url, server.proc.pid, args.requests)
    finally:
        server.stop()
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{report['requests']} requests in {report['seconds']} s, failures {len(report['failures'])}; RSS "
          f"{report['rss_growth_pct']:+.2f} %, fds {report['fd_growth']:+d}, threads {report['thread_growth']:+d}"
          + (f", GPU reserved {report['gpu_reserved_growth_pct']:+.2f} %" if report["gpu_reserved_growth_pct"]
             is not None else "") + f" -> {'PASS' if report['passed'] else 'FAIL'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
