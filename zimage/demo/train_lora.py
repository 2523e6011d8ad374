"""Train a style LoRA for the tiny demo model, with the project's flow-matching recipe, the model frozen.

    python -m zimage.demo.train_lora --style negative --out models/tiny-demo-loras --time-limit 900 --steps 3000 \
        --rank 8 --alpha 8 --lr 1e-3 --dataset 1024                    # the shipped LoRA: 13 minutes on 2 CPU cores
    python -m zimage.demo.train_lora --smoke --out /tmp/lora              # seconds; checks the wiring

Styles (no trigger word: the LoRA is the style):
    negative  every palette colour drawn as its opposite (COMPLEMENT), shapes and background; layout unchanged
    outline   shapes drawn as outlines (scenes.render(..., outline=OUTLINE)); harder: 1200 CPU steps removed the
              fill without drawing a clean outline (not shipped)

A rank-r LoRA on the layers real Z-Image LoRAs train (attention to_q/to_k/to_v/to_out.0 and feed_forward
w1/w2/w3 of every block, refiners included) learns, by the same flow-matching objective and sigma sampling as
zimage.demo.train, to draw each caption's scene in the style. `--dataset N` renders and VAE-encodes N scenes once.

Saved in diffusers' layout (`ZImagePipeline.save_lora_weights`, r and lora_alpha in its metadata) as
`<out>/<style>.safetensors`, plus `<style>.training.json` (command, steps, losses, seconds, the measured effect)
and SHA256SUMS. `python -m zimage.demo.lora_formats` re-saves it in the kohya/musubi and ComfyUI layouts
(tests/fixtures/loras/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import MODEL_DIR, scenes
from .train import (CaptionEmbeddings, inference_sigmas, lr_at, recent_mean, sample_sigmas, write_checksums,
                    GRID_STEP_COUNTS, SEED)

OUTLINE = 0.4  # band width as a fraction of the shape's radius
# "negative": every colour drawn as its opposite in the palette (shapes and background), the layout unchanged.
COMPLEMENT = {"red": "green", "green": "red", "blue": "orange", "orange": "blue", "yellow": "purple",
              "purple": "yellow", "white": "black", "black": "white"}
STYLES = ("outline", "negative")


def styled(scene: scenes.Scene, style: str) -> scenes.Scene:
    """The scene a caption's picture shows in `style` (outline: the same scene, drawn with outline=OUTLINE)."""
    if style == "negative":
        return scenes.Scene(COMPLEMENT[scene.background],
                            tuple(dataclasses.replace(s, colour=COMPLEMENT[s.colour]) for s in scene.shapes))
    return scene
TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# Scenes the closing evaluation (and tests/test_lora.py) measure: medium and large single shapes, whose
# outline's middle is wide enough to read.
EVAL_SCENES = [scenes.Scene("blue", (scenes.Shape("circle", "red", "centre", "large"),)),
               scenes.Scene("white", (scenes.Shape("square", "black", "left", "medium"),)),
               scenes.Scene("purple", (scenes.Shape("circle", "yellow", "right", "medium"),)),
               scenes.Scene("black", (scenes.Shape("square", "orange", "centre", "large"),))]


class TrainableLora(torch.nn.Module):
    """base(x) + (alpha / r) * up(down(x)); down Kaiming-uniform, up zero (the LoRA starts as a no-op)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        device = base.weight.device  # beside the frozen layer (the device, for --device cuda)
        self.down = torch.nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.up = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        torch.nn.init.kaiming_uniform_(self.down, a=5 ** 0.5)

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.down), self.up)


def add_lora(transformer, rank: int, alpha: float) -> dict[str, TrainableLora]:
    layers = {}
    for name, module in list(transformer.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            parent, _, child = name.rpartition(".")
            layers[name] = TrainableLora(module, rank, alpha)
            setattr(transformer.get_submodule(parent), child, layers[name])
    return layers


def train(pipe, layers: dict[str, TrainableLora], args, rng: random.Random, device) -> list[float]:
    transformer, vae = pipe.transformer, pipe.vae
    params = [p for layer in layers.values() for p in (layer.down, layer.up)]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    embed = CaptionEmbeddings(pipe, device)
    grid = torch.tensor(sorted({s for n in GRID_STEP_COUNTS for s in inference_sigmas(pipe.scheduler.config, n)}),
                        device=device)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    noise_gen = torch.Generator(device).manual_seed(args.seed)

    outline = OUTLINE if args.style == "outline" else 0.0

    @torch.no_grad()
    def encode(drawn, width, height):
        pictures = scenes.render([styled(d, args.style) for d in drawn], width, height, rng, device, outline=outline)
        return (vae.encode(pictures).latent_dist.mode() - shift) * scale

    dataset = []  # (scene, latents) encoded once: on a CPU the VAE would otherwise take a third of every step
    if args.dataset:
        width, height = args.size or (256, 256)
        started = time.perf_counter()
        for start in range(0, args.dataset, 32):
            drawn = [scenes.sample_scene(rng) for _ in range(min(32, args.dataset - start))]
            dataset += zip(drawn, encode(drawn, width, height))
        embed([c for s, _ in dataset for c in s.captions()])
        print(f"dataset: {len(dataset)} scenes at {width}x{height} in {time.perf_counter() - started:.0f}s", flush=True)
    losses, started, step = [], time.perf_counter(), 0
    while (progress := max(step / args.steps, (time.perf_counter() - started) / args.time_limit)) < 1:
        for group in opt.param_groups:
            group["lr"] = lr_at(args.lr, step, progress, warmup=50)
        if dataset:
            picked = [dataset[rng.randrange(len(dataset))] for _ in range(args.batch)]
            drawn, x0 = [s for s, _ in picked], torch.stack([z for _, z in picked])
            width, height = x0.shape[-1] * 8, x0.shape[-2] * 8
        else:
            width, height = args.size if args.size else rng.choice(args.sizes)
            drawn = [scenes.sample_scene(rng) for _ in range(args.batch)]
            x0 = encode(drawn, width, height)
        captions = [rng.choice(s.captions()) for s in drawn]
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        sigma = sample_sigmas(len(drawn), grid, noise_gen, args.sigma_one)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        out = transformer(list(noisy.unsqueeze(2).unbind(0)), 1 - sigma, embed(captions), return_dict=False)[0]
        loss = F.mse_loss(torch.stack([o.float() for o in out]).squeeze(2), x0 - noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.detach())
        if step % args.log_every == 0:
            print(f"lora step {step:5d}  loss {recent_mean(losses):.4f}  {width}x{height}x{len(drawn)}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {time.perf_counter() - started:.0f}s", flush=True)
        step += 1
    print(f"lora: {step} steps in {time.perf_counter() - started:.0f}s, loss {recent_mean(losses):.4f}", flush=True)
    return [float(v) for v in torch.stack(losses).cpu()]


def save(layers: dict[str, TrainableLora], out: Path, rank: int, alpha: float, dtype: torch.dtype,
         name: str) -> Path:
    """diffusers' LoRA layout through diffusers itself: keys transformer.<layer>.lora_A/lora_B.weight, and the
    adapter config (r, lora_alpha, target_modules) in the file's metadata, as peft saves it."""
    from diffusers import ZImagePipeline

    weights = {}
    for layer_name, layer in sorted(layers.items()):
        weights[f"{layer_name}.lora_A.weight"] = layer.down.detach().to("cpu", dtype).contiguous()
        weights[f"{layer_name}.lora_B.weight"] = layer.up.detach().to("cpu", dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    ZImagePipeline.save_lora_weights(out, transformer_lora_layers=weights, weight_name=f"{name}.safetensors",
                                     transformer_lora_adapter_metadata={
                                         "r": rank, "lora_alpha": alpha, "target_modules": list(TARGETS),
                                         "peft_type": "LORA", "bias": "none"})
    return out / f"{name}.safetensors"


def evaluate(lora_dir: Path, device: str, style: str, steps: int = 8) -> dict:
    """The demo model with and without the LoRA on EVAL_SCENES through the project's Engine, read as the tests
    read it: outline -- measure.outline_read (the shape's colour on a band inside its edge and in its middle);
    negative -- measure.read against the scene in opposite colours (border and shape core in those colours)."""
    from ..engine import Engine
    from ..request import GenerationRequest
    from ..settings import Settings
    from . import measure

    engine = Engine.create(Settings(model="tiny", device=device, dtype="fp32", compile="off", warmup="off",
                                    lora_dir=lora_dir))
    engine.mark_ready()
    report = {}
    for scene in EVAL_SCENES:
        for label, loras in (("base", None), (style, [{"name": style, "scale": 1.0}])):
            image = engine.generate(engine.resolve(GenerationRequest(scene.english(), width=256, height=256,
                                                                     steps=steps, seed=0, loras=loras))).images[0]
            if style == "outline":
                reading = measure.outline_read(image, scene, OUTLINE)[0]
                entry = {"band": reading.band, "middle": reading.middle,
                         "middle_background": reading.middle_background, "score": reading.score}
            else:
                reading = measure.read(image, styled(scene, style))
                entry = {"border": reading.border_fraction, "core": reading.shapes[0].core_fraction}
            report.setdefault(scene.english(), {})[label] = {k: round(v, 3) for k, v in entry.items()}
            print(f"{label:8s} {scene.english()!r}: {reading.summary()}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for <style>.safetensors (+ training.json)")
    parser.add_argument("--style", choices=STYLES, default="negative")
    parser.add_argument("--base", type=Path, default=MODEL_DIR, help="the demo model folder (frozen)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=SEED + 7)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=1500, help="steps (or --time-limit, if sooner)")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sigma-one", type=float, default=0.25)
    parser.add_argument("--size", type=lambda v: tuple(int(x) for x in v.split("x")), metavar="WxH",
                        help="train at this one size (default: a mix of 256x256, 192x320, 320x192)")
    parser.add_argument("--dataset", type=int, default=2048,
                        help="scenes rendered and VAE-encoded once at --size (default 256x256), then sampled; "
                             "0: render and encode fresh scenes every step, at a mix of sizes")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16")
    parser.add_argument("--smoke", action="store_true", help="3 steps at 64x64, no evaluation: checks the wiring")
    parser.add_argument("--no-eval", action="store_true")
    args = parser.parse_args(argv)
    args.sizes = [(256, 256), (192, 320), (320, 192)]
    if args.smoke:
        args.steps, args.batch, args.size, args.log_every, args.no_eval = 3, 2, (64, 64), 1, True
        args.dataset = min(args.dataset, 8)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    started = time.perf_counter()

    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(args.base, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for module in (pipe.text_encoder, pipe.vae, pipe.transformer):
        module.requires_grad_(False)
    pipe.vae.eval()
    layers = add_lora(pipe.transformer, args.rank, args.alpha)
    pipe.transformer.train()
    losses = train(pipe, layers, args, rng, device)
    path = save(layers, args.out, args.rank, args.alpha, torch.float16 if args.save_dtype == "fp16" else torch.float32,
                args.style)
    info = {"command": "python -m zimage.demo.train_lora " + " ".join(sys.argv[1:] if argv is None else argv),
            "base": str(args.base), "style": args.style, "seed": args.seed, "rank": args.rank, "alpha": args.alpha,
            **({"outline": OUTLINE} if args.style == "outline" else {"colours": COMPLEMENT}),
            "layers": len(layers), "steps": len(losses), "lr": args.lr, "batch": args.batch,
            "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 5), "time_limit": args.time_limit,
            "seconds": round(time.perf_counter() - started), "save_dtype": args.save_dtype,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    if not args.no_eval:
        info["evaluation"] = evaluate(args.out, "cpu", args.style)
    (args.out / f"{args.style}.training.json").write_text(json.dumps(info, indent=1, sort_keys=True,
                                                                     ensure_ascii=False) + "\n")
    write_checksums(args.out)
    print(f"saved {path} ({path.stat().st_size / 1e3:.0f} kB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
