"""Load test: concurrent clients mixing the Gradio API and the JSON API against the tiny model.

    python -m tests.load --minutes 2                  # starts its own app (queue size 8), loopback only
    python -m tests.load --url http://127.0.0.1:7860 --clients 16 --minutes 1

Each client loops until the time is up: half of its calls go through gradio_client (api_name="generate",
Draft), half through POST /v1/images/generations (256x256, 2 steps). A full queue is an expected answer
(HTTP 429 / "queue is full"): the client waits Retry-After (at most 2 s) and goes on. Anything else is an
error. A sampler reads /metrics every 0.5 s for the queue depth; at the end the engine's own maximum
concurrency (must be 1) is read. Writes JSON (--out) and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from zimage.appprocess import AppProcess, http

GENERATION_BODY = {"size": "256x256", "steps": 2, "output_format": "jpeg"}


def metric_value(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)}(?:\{{\}})? ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else None


def staggered(url: str, requests: int = 12, gap: float = 0.15, body: dict | None = None) -> list[dict]:
    """Requests sent `gap` seconds apart; per request: when it was sent and answered, and its engine time.

    With one queue and generations on their own thread, request i is answered about its engine time after
    the later of its arrival and the previous answer; a response held behind queued work breaks that."""
    body = body or {"size": "512x512", "steps": 2, "output_format": "jpeg"}
    rows: list[dict] = []
    lock = threading.Lock()
    t_zero = time.monotonic()

    def one(i: int) -> None:
        sent = time.monotonic() - t_zero
        status, _, payload = http("POST", url + "/v1/images/generations",
                                  json.dumps({"prompt": f"staggered {i}", "seed": i, **body}).encode(),
                                  {"Content-Type": "application/json"}, timeout=600)
        answered = time.monotonic() - t_zero
        engine = json.loads(payload)["zimage"]["timings"]["total"] if status == 200 else None
        with lock:
            rows.append({"i": i, "status": status, "sent": round(sent, 3), "answered": round(answered, 3),
                         "engine": engine})

    threads = []
    for i in range(requests):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        time.sleep(gap)
    for t in threads:
        t.join(timeout=600)
    rows.sort(key=lambda r: r["answered"])
    previous = 0.0
    for row in rows:  # the time an answer took beyond its own generation, once its turn came
        row["excess"] = round(row["answered"] - max(row["sent"], previous) - (row["engine"] or 0), 3)
        previous = row["answered"]
    return rows


def run(url: str, clients: int, seconds: float, auth: tuple[str, str] | None = None) -> dict:
    from gradio_client import Client

    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    outcomes: list[dict] = []
    depth_series: list[tuple[float, float, float]] = []
    start = time.monotonic()

    def record(kind: str, route: str, seconds_taken: float, detail: str = "") -> None:
        with lock:
            outcomes.append({"kind": kind, "route": route, "seconds": round(seconds_taken, 3), "detail": detail[:300]})

    def client_loop(index: int) -> None:
        gradio = None
        i = 0
        while time.monotonic() < deadline:
            i += 1
            t0 = time.perf_counter()
            if (index + i) % 2:
                body = json.dumps({"prompt": f"load {index}-{i}", "seed": i, **GENERATION_BODY}).encode()
                try:
                    status, headers, payload = http("POST", url + "/v1/images/generations", body,
                                                    {"Content-Type": "application/json"}, timeout=600)
                except OSError as exc:
                    record("error", "openai", time.perf_counter() - t0, repr(exc))
                    continue
                if status == 200:
                    record("ok", "openai", time.perf_counter() - t0)
                elif status == 429:
                    record("busy", "openai", time.perf_counter() - t0)
                    time.sleep(min(2.0, float(headers.get("retry-after", "1"))))
                else:
                    record("error", "openai", time.perf_counter() - t0, f"{status} {payload[:200]!r}")
            else:
                try:
                    gradio = gradio or Client(url, auth=auth, verbose=False)
                    gradio.predict(f"load {index}-{i}", "Draft", "1:1", i, False, 1, api_name="/generate")
                    record("ok", "gradio", time.perf_counter() - t0)
                except Exception as exc:  # gradio_client raises plain exceptions for a full queue
                    text = str(exc)
                    if "queue is full" in text.lower() or "busy" in text.lower():
                        record("busy", "gradio", time.perf_counter() - t0)
                        time.sleep(1.0)
                    else:
                        record("error", "gradio", time.perf_counter() - t0, f"{type(exc).__name__}: {text}")

    def sampler() -> None:
        while time.monotonic() < deadline:
            try:
                text = http("GET", url + "/metrics", timeout=10)[2].decode()
                depth = metric_value(text, "zimage_queue_depth") or 0.0
                inflight = metric_value(text, "zimage_inflight") or 0.0
                depth_series.append((round(time.monotonic() - start, 2), depth, inflight))
            except OSError:
                pass
            time.sleep(0.5)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    threads.append(threading.Thread(target=sampler, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 900)
    metrics = http("GET", url + "/metrics", timeout=30)[2].decode()
    ok = [o["seconds"] for o in outcomes if o["kind"] == "ok"]
    quantiles = statistics.quantiles(ok, n=20) if len(ok) >= 2 else [float("nan")] * 19
    depths = [d for _, d, _ in depth_series]
    return {
        "clients": clients, "seconds": seconds,
        "completed": len(ok),
        "completed_by_route": {r: sum(o["kind"] == "ok" and o["route"] == r for o in outcomes)
                               for r in ("gradio", "openai")},
        "rejected_busy": sum(o["kind"] == "busy" for o in outcomes),
        "errors": [o for o in outcomes if o["kind"] == "error"],
        "max_engine_concurrency": metric_value(metrics, "zimage_engine_max_concurrency"),
        "max_engine_waiting": metric_value(metrics, "zimage_engine_max_waiting"),
        "latency_p50_s": round(statistics.median(ok), 3) if ok else None,
        "latency_p95_s": round(quantiles[18], 3) if ok else None,
        "queue_depth": {"max": max(depths, default=0), "mean": round(statistics.mean(depths), 2) if depths else 0,
                        "series": depth_series},
    }


def table(report: dict) -> str:
    rows = [("clients", report["clients"]), ("seconds", report["seconds"]), ("completed", report["completed"]),
            ("  via gradio / openai", f"{report['completed_by_route']['gradio']} / "
                                      f"{report['completed_by_route']['openai']}"),
            ("rejected as busy", report["rejected_busy"]), ("errors", len(report["errors"])),
            ("max engine concurrency", report["max_engine_concurrency"]),
            ("latency p50 / p95 (s)", f"{report['latency_p50_s']} / {report['latency_p95_s']}"),
            ("queue depth max / mean", f"{report['queue_depth']['max']} / {report['queue_depth']['mean']}")]
    return "\n".join(f"{k:<26} {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Load test against the tiny model (loopback only).")
    ap.add_argument("--url", help="a running server; default: start one (tiny model, queue size 8)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--out", default="load-report.json")
    args = ap.parse_args(argv)
    server = None
    url = args.url
    if url is None:
        tmp = Path(tempfile.mkdtemp(prefix="zimage-load-"))
        server = AppProcess(tmp, tmp / "cache", "--queue-size", "8", "--warmup", "off").start()
        server.wait_ready(timeout=600)
        url = server.url
    try:
        report = run(url, args.clients, args.minutes * 60)
    finally:
        if server:
            server.stop()
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report))
    for error in report["errors"][:5]:
        print("error:", error)
    ok = not report["errors"] and report["max_engine_concurrency"] == 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
