"""Warm a running server through its HTTP API (one generation per preset), e.g. after a deploy:

    python warmup.py --url http://127.0.0.1:7860 [--auth user:password] [--presets Draft,Standard]

The app warms itself at start-up (`Engine.warm_up`, zimage/warmup.py); this is the same from outside.
"""

from __future__ import annotations

import argparse
import sys

from zimage.presets import TIERS
from zimage.warmup import warm_remote


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
