"""Generate images from the command line, without the web app.

    python -m zimage "a red circle on a blue background" --model tiny -o red-circle.png

Takes the request options below plus every service setting (--model, --device, ...; `--help` lists both).
With n > 1 the files are named <stem>-<seed>.png.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .engine import Engine
from .images import save_png
from .loading import quiet_libraries
from .presets import ASPECTS, DEFAULT_ASPECT, DEFAULT_TIER, TIERS
from .request import MAX_IMAGES, EngineError, GenerationRequest
from .settings import Settings, SettingsError, add_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zimage", description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", help="what to draw")
    request = parser.add_argument_group("request")
    request.add_argument("-o", "--out", default="zimage.png", help="PNG file to write [default zimage.png]")
    request.add_argument("--preset", default=DEFAULT_TIER, help=f"quality: one of {', '.join(TIERS)} "
                                                                 f"[default {DEFAULT_TIER}]")
    request.add_argument("--aspect", default=DEFAULT_ASPECT, help=f"one of {', '.join(ASPECTS)} "
                                                                   f"[default {DEFAULT_ASPECT}]")
    request.add_argument("--width", type=int, help="custom width (with --height) instead of the preset's size")
    request.add_argument("--height", type=int, help="custom height (with --width)")
    request.add_argument("--steps", type=int, help="denoising steps [default: the preset's]")
    request.add_argument("--seed", type=int, help="seed [default: random]")
    request.add_argument("-n", type=int, default=1, help=f"number of images, 1-{MAX_IMAGES} [default 1]")
    return add_options(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_args(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        engine = Engine.create(settings)
        engine.mark_ready()
        result = engine.generate(engine.resolve(GenerationRequest(
            prompt=args.prompt, preset=args.preset, aspect=args.aspect, width=args.width, height=args.height,
            steps=args.steps, seed=args.seed, n=args.n)))
    except (EngineError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    for image, seed in zip(result.images, result.seeds):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{seed}{out.suffix}")
        save_png(image, path, result, seed, engine.settings.model)
        print(f"{path}  seed={seed}  {result.width}x{result.height}  steps={result.steps}  "
              f"{result.timings['total']:.2f}s")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
