"""Scale-out throughput: closed-loop clients against the JSON API; images/minute, latency, requests per replica.

    # against a running service (python app.py --replicas N, or serve run deploy/ray/serve_config.yaml)
    python bench/scaleout.py --url http://127.0.0.1:7860 --clients 16 --seconds 120 --out scaleout.json
    # or start one: app.py with these flags (after --), on a free port, stopped at the end
    python bench/scaleout.py --clients 4 --seconds 30 -- --model tiny --replicas 2 --replica-gpus 0

Each client sends one POST /v1/images/generations, waits for the answer, sends the next (closed loop), until
--seconds have passed; answers that arrive after that still count (their time is in `wall_s`). A 429 is
counted as `busy` and retried after Retry-After (at most 2 s). Reported: images per minute over the wall
time, latency p50/p95/max of successful requests (client side: queueing included), engine seconds p50,
requests per replica (`zimage.replica` of each answer; "local" for the single-process service), the
replicas ready before and after (/readyz; the run starts once all are ready). Prints a table; writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zimage.appprocess import AppProcess, http  # noqa: E402


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 3)


def readiness(url: str) -> dict:
    try:
        status, _, body = http("GET", url + "/readyz", timeout=10)
        answer = json.loads(body)
    except (OSError, ValueError):
        return {"status": 0}
    replicas = answer.get("replicas") or {}
    return {"status": status, "ready": replicas.get("ready", 1 if status == 200 else 0),
            "total": replicas.get("total", 1), "device": (answer.get("engine") or {}).get("device")}


def run(url: str, clients: int, seconds: float, body: dict, headers: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json", **(headers or {})}
    lock = threading.Lock()
    rows: list[dict] = []
    before = readiness(url)
    start = time.monotonic()
    deadline = start + seconds

    def client(index: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            payload = {**body, "prompt": f"{body.get('prompt', 'a red circle on a blue background')}",
                       "seed": index * 100_000 + n}
            n += 1
            sent = time.monotonic()
            try:
                status, hdrs, raw = http("POST", url + "/v1/images/generations", json.dumps(payload).encode(),
                                         headers, timeout=900)
            except OSError as exc:
                status, hdrs, raw = 0, {}, str(exc).encode()
            took = time.monotonic() - sent
            row = {"client": index, "status": status, "seconds": round(took, 3), "sent": round(sent - start, 3)}
            if status == 200:
                answer = json.loads(raw)
                row.update(images=len(answer["data"]), replica=answer["zimage"].get("replica", "local"),
                           engine=answer["zimage"]["timings"]["total"])
            elif status == 429:
                time.sleep(min(2.0, float(hdrs.get("retry-after", "1"))))
            else:
                row["error"] = raw[:300].decode(errors="replace")
            with lock:
                rows.append(row)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    ok = [r for r in rows if r["status"] == 200]
    images = sum(r["images"] for r in ok)
    latencies = [r["seconds"] for r in ok]
    return {
        "url": url, "clients": clients, "seconds": seconds, "wall_s": round(wall, 2), "body": body,
        "requests": len(rows), "ok": len(ok), "busy": sum(1 for r in rows if r["status"] == 429),
        "errors": [r for r in rows if r["status"] not in (200, 429)],
        "images": images, "images_per_minute": round(60 * images / wall, 2) if wall else 0.0,
        "latency_s": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                      "max": max(latencies) if latencies else None,
                      "mean": round(statistics.fmean(latencies), 3) if latencies else None},
        "engine_s_p50": percentile([r["engine"] for r in ok], 0.5),
        "per_replica": dict(sorted(Counter(r["replica"] for r in ok).items())),
        "replicas_before": before, "replicas_after": readiness(url),
        "rows": rows,
    }


def table(report: dict) -> str:
    lat = report["latency_s"]
    lines = [
        f"{'clients':>8} {'wall s':>8} {'ok':>5} {'busy':>5} {'errors':>6} {'images':>7} {'img/min':>9} "
        f"{'p50 s':>7} {'p95 s':>7} {'engine p50':>10}",
        f"{report['clients']:>8} {report['wall_s']:>8} {report['ok']:>5} {report['busy']:>5} "
        f"{len(report['errors']):>6} {report['images']:>7} {report['images_per_minute']:>9} "
        f"{lat['p50'] if lat['p50'] is not None else '-':>7} {lat['p95'] if lat['p95'] is not None else '-':>7} "
        f"{report['engine_s_p50'] if report['engine_s_p50'] is not None else '-':>10}",
        "", f"{'replica':>12} {'requests':>9}",
    ]
    lines += [f"{name:>12} {count:>9}" for name, count in report["per_replica"].items()]
    after = report["replicas_after"]
    lines.append(f"replicas ready: {report['replicas_before'].get('ready')}/{report['replicas_before'].get('total')} "
                 f"before, {after.get('ready')}/{after.get('total')} after ({after.get('device')})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running service; without it, app.py is started with the flags after --")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients [8]")
    parser.add_argument("--seconds", type=float, default=60, help="how long clients send new requests [60]")
    parser.add_argument("--size", default="1024x1024", help="image size [1024x1024]")
    parser.add_argument("--steps", type=int, help="denoising steps [the quality's]")
    parser.add_argument("--quality", default="Standard", help="quality preset [Standard]")
    parser.add_argument("--n", type=int, default=1, help="images per request [1]")
    parser.add_argument("--output-format", default="jpeg", help="png, jpeg or webp [jpeg: cheapest to encode]")
    parser.add_argument("--bearer", help="the service's password (--auth), sent as Authorization: Bearer")
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for a started app")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("app_args", nargs="*", help="after --: flags for app.py when --url is not given")
    args = parser.parse_args(argv)

    body = {"prompt": "a red circle on a blue background", "size": args.size, "quality": args.quality,
            "n": args.n, "output_format": args.output_format}
    if args.steps:
        body["steps"] = args.steps
    headers = {"Authorization": f"Bearer {args.bearer}"} if args.bearer else None
    app = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        folder = Path(tempfile.mkdtemp(prefix="zimage-scaleout-"))
        app = AppProcess(folder, folder / "cache", *args.app_args)  # flags after -- come last: they win
        print(f"starting app.py {' '.join(app.args)} (log: {app.log_path})", file=sys.stderr)
        app.start()
        try:
            app.wait_ready(timeout=args.ready_timeout)
        except BaseException:
            app.stop()
            raise
        url = app.url
    try:
        deadline = time.monotonic() + args.ready_timeout  # /readyz is 200 with one replica: wait for all of them
        while (state := readiness(url)).get("ready", 0) < state.get("total", 1) and time.monotonic() < deadline:
            time.sleep(1)
        report = run(url, args.clients, args.seconds, body, headers)
    finally:
        if app is not None:
            app.stop()
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
