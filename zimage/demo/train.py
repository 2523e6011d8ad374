"""Train the tiny demo model in the classes the service loads, and save it with save_pretrained.

    python -m zimage.demo.train --device cuda --out models/tiny-demo     # a few minutes on one H100
    python -m zimage.demo.train --device cuda --resume models/tiny-demo --out models/tiny-demo ...  # continue
    python -m zimage.demo.train --smoke --device cpu --out /tmp/demo      # seconds; checks the wiring

1. VAE (`AutoencoderKL`, 16 latent channels, /8) as an autoencoder on rendered scenes. Its latents' mean
   and spread then become the config's `shift_factor` and `scaling_factor`, which the pipeline applies.
2. Transformer (`ZImageTransformer2DModel`) by flow matching on those latents, conditioned on prompt
   embeddings from `ZImagePipeline.encode_prompt` itself (chat template, `hidden_states[-2]` of the frozen
   random Qwen3, padding dropped), at 256x256, small custom sizes and every preset size, at sigmas drawn the
   way the pipeline spaces them (shift 3), at the exact sigmas of 3-, 4-, 6- and 8-step runs, and often at
   sigma 1. `--resume FOLDER` starts from a saved model's VAE (kept as is) and transformer.
3. `save_pretrained` plus SHA256SUMS, then (not in --smoke) a report on held-out prompts through the Engine.

The shipped weights are a base run and five continuations; models/tiny-demo/training.json records each
command, and the README lists them.

Sign convention, from ZImagePipeline.__call__: the transformer gets timestep (1000 - t) / 1000 = 1 - sigma,
the pipeline negates its output and the Euler step is x(s') = x(s) + (s' - s) * noise_pred. With
x(s) = (1 - s) x0 + s noise, dx/ds = noise - x0, so the transformer must output x0 - noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import presets, tiny
from ..engine import MAX_SEQUENCE_LENGTH
from . import scenes

SEED = 20251124
SHIFT = 3.0
# Bigger than tiny-random's transformer (positions must be learnt up to 147 tokens wide), still ~7 MB.
TRANSFORMER = dict(dim=128, n_layers=3, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
                   cap_feat_dim=tiny.TEXT_ENCODER["hidden_size"], axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512])
# No mid-block attention: decoding cost stays linear in pixels and the decoder works the same at any size.
# sample_size 1024 makes tiled decoding use 1024-pixel tiles, like the real FLUX VAE.
# One GroupNorm group: with one group per channel (tiny-random's 8 groups on 8 channels) a flat colour
# normalises to zero, and the VAE cannot learn which colour it was.
VAE = {**tiny.VAE, "block_out_channels": [8, 16, 32, 32], "norm_num_groups": 1, "sample_size": 1024,
       "mid_block_add_attention": False}
VAE_SIZES = [(256, 256), (192, 320), (320, 192), (128, 384), (384, 128)]
GRID_STEP_COUNTS = (3, 4, 6, 8)  # sigmas of these runs are trained exactly, not only nearby
GRID_FRACTION = 0.3
# Pure noise (sigma 1, the first step of every run) is where the picture is decided from the caption alone;
# at any lower sigma the transformer can read the layout off its noisy input instead. Without extra weight
# there, a short run learns to denoise but starts every picture as an empty background.
SIGMA_ONE_FRACTION = 0.25
PRESET_FRACTION = 0.4  # of transformer batches at a preset's size (the rest: 256x256 and small custom sizes)
SIZE_256_FRACTION = 0.3


def build_untrained(seed: int = SEED):
    """The demo pipeline before training: demo tokenizer, frozen random Qwen3, fresh VAE and transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    # The chat template's words join the corpus so they are single tokens: every prompt then fits in the
    # transformer's first 32-token caption block.
    tokenizer = tiny.build_tokenizer(corpus=scenes.corpus() + ["user\n", "assistant\n"] * 100, split_cjk=True)
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), **tiny.TEXT_ENCODER)).eval()
    torch.manual_seed(seed + 1)
    transformer = ZImageTransformer2DModel(**TRANSFORMER)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


def lr_at(base: float, step: int, progress: float, warmup: int) -> float:
    """Linear warm-up, then cosine down to 5 % as progress goes 0 -> 1."""
    return base * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_vae(vae, args, rng: random.Random, device) -> list[float]:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    losses, started = [], time.perf_counter()
    step = 0
    while (progress := max(step / args.vae_steps, (time.perf_counter() - started) / args.vae_time_limit)) < 1:
        for group in opt.param_groups:
            group["lr"] = lr_at(args.vae_lr, step, progress, warmup=100)
        width, height = rng.choice(args.vae_sizes)
        images = scenes.render([scenes.sample_scene(rng) for _ in range(args.vae_batch)], width, height, rng, device)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # KL per latent element keeps the latents near unit scale; sampling makes the decoder forgive small
        # latent errors, which is what the transformer's samples will have.
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())  # read back only when logging: a sync per step would stall the GPU
        if step % args.log_every == 0:
            print(f"vae step {step:5d}  loss {recent_mean(losses):.4f}  {time.perf_counter() - started:.0f}s", flush=True)
        step += 1
    print(f"vae: {step} steps in {time.perf_counter() - started:.0f}s, loss {recent_mean(losses):.4f}", flush=True)
    vae.eval().requires_grad_(False)
    return [float(l) for l in torch.stack(losses).cpu()] if losses else []


def recent_mean(losses: list, n: int = 100) -> float:
    return torch.stack(losses[-n:]).mean().item()


@torch.no_grad()
def set_latent_normalisation(vae, rng: random.Random, device, batches: int) -> None:
    """shift_factor = mean and scaling_factor = 1 / std of the latents, so the transformer sees unit scale."""
    latents = [vae.encode(scenes.render([scenes.sample_scene(rng) for _ in range(16)], 256, 256, rng, device))
               .latent_dist.mode() for _ in range(batches)]
    z = torch.cat([l.flatten() for l in latents])
    vae.register_to_config(shift_factor=round(z.mean().item(), 4), scaling_factor=round(1 / z.std().item(), 4))
    print(f"latents: shift_factor {vae.config.shift_factor}, scaling_factor {vae.config.scaling_factor}", flush=True)


class CaptionEmbeddings:
    """Captions -> the pipeline's own prompt embeddings (the text encoder is frozen), cached."""

    def __init__(self, pipe, device):
        self.pipe, self.device, self.cache = pipe, device, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> list[torch.Tensor]:
        missing = sorted({c for c in captions if c not in self.cache})
        for start in range(0, len(missing), 512):
            chunk = missing[start:start + 512]
            # encode_prompt rewrites the list it is given in place (chat template), so it gets a copy.
            embeds, _ = self.pipe.encode_prompt(list(chunk), device=self.device, do_classifier_free_guidance=False,
                                                max_sequence_length=MAX_SEQUENCE_LENGTH)
            self.cache.update(zip(chunk, embeds))
        return [self.cache[c] for c in captions]


def inference_sigmas(scheduler_config, steps: int) -> list[float]:
    """The sigmas ZImagePipeline runs the transformer at for `steps` steps (the scheduler's own arithmetic)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), device="cpu")
    return scheduler.sigmas[:-1].tolist()


def sample_sigmas(n: int, grid: torch.Tensor, generator: torch.Generator, one_fraction: float) -> torch.Tensor:
    """Shift-3 spaced sigmas (uniform s, then the scheduler's shift), some exactly on inference grids, some 1."""
    device = grid.device
    s = 1 - torch.rand(n, generator=generator, device=device)  # (0, 1]
    spaced = SHIFT * s / (1 + (SHIFT - 1) * s)
    on_grid = grid[torch.randint(len(grid), (n,), generator=generator, device=device)]
    roll = torch.rand(n, generator=generator, device=device)
    sigma = torch.where(roll < GRID_FRACTION, on_grid, spaced)
    return torch.where(roll > 1 - one_fraction, torch.ones_like(sigma), sigma)


def training_size(rng: random.Random, args) -> tuple[int, int]:
    if args.size:
        return args.size
    roll = rng.random()
    if roll < args.preset_fraction:
        return presets.preset_size(rng.choice(list(presets.TIERS)), rng.choice(list(presets.ASPECTS)))
    if roll < args.preset_fraction + args.size_256_fraction:
        return 256, 256
    area, ratio = rng.uniform(256 * 256, 640 * 640), math.exp(rng.uniform(-math.log(2.5), math.log(2.5)))
    return (max(128, round(math.sqrt(area * ratio) / 16) * 16), max(128, round(math.sqrt(area / ratio) / 16) * 16))


def train_transformer(pipe, args, rng: random.Random, device) -> list[float]:
    transformer, vae = pipe.transformer, pipe.vae
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    captions_to_embeds = CaptionEmbeddings(pipe, device)
    if torch.device(device).type == "cuda":
        captions_to_embeds(scenes.every_caption())  # all at once, so training steps never wait for the encoder
    grid = torch.tensor(sorted({s for n in GRID_STEP_COUNTS for s in inference_sigmas(pipe.scheduler.config, n)}),
                        device=device)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    noise_gen = torch.Generator(device).manual_seed(args.seed)
    losses, started, step = [], time.perf_counter(), 0
    while (progress := max(step / args.steps, (time.perf_counter() - started) / args.time_limit)) < 1:
        for group in opt.param_groups:
            group["lr"] = lr_at(args.lr, step, progress, warmup=args.warmup)
        width, height = training_size(rng, args)
        batch = max(1, min(args.max_batch, args.batch_tokens // ((width // 16) * (height // 16))))
        drawn = [scenes.sample_scene(rng) for _ in range(batch)]
        captions = [rng.choice(s.captions()) for s in drawn]
        with torch.no_grad():
            images = scenes.render(drawn, width, height, rng, device)
            x0 = (vae.encode(images).latent_dist.mode() - shift) * scale  # inverse of the pipeline's decode
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        sigma = sample_sigmas(batch, grid, noise_gen, args.sigma_one)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        timestep = (1000 - sigma * 1000) / 1000  # what the pipeline passes for t = sigma * 1000
        out = transformer(list(noisy.unsqueeze(2).unbind(0)), timestep, captions_to_embeds(captions),
                          return_dict=False)[0]
        prediction = torch.stack([o.float() for o in out]).squeeze(2)
        loss = F.mse_loss(prediction, x0 - noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.detach())
        if step % args.log_every == 0:
            print(f"transformer step {step:6d}  loss {recent_mean(losses):.4f}  "
                  f"{width}x{height}x{batch}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
        step += 1
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    transformer.eval().requires_grad_(False)
    print(f"transformer: {step} steps in {time.perf_counter() - started:.0f}s, loss {recent_mean(losses):.4f}",
          flush=True)
    return [float(l) for l in torch.stack(losses).cpu()]


def resumed_from(folder: Path | None) -> dict | None:
    """The starting folder and its own training record, so a chain of runs stays on record."""
    if folder is None:
        return None
    record = folder / "training.json"
    return {"folder": str(folder), **(json.loads(record.read_text()) if record.is_file() else {})}


def write_checksums(folder: Path) -> None:
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}"
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "SHA256SUMS"]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def save(pipe, out: Path, info: dict, dtype: torch.dtype) -> None:
    """save_pretrained into a fresh sibling folder, then swap it in (no stale files from older runs).

    fp16 halves the trained files (the repo keeps tracked files under 5 MiB); loading upcasts them to the run's
    dtype. The frozen text encoder stays fp32: its embeddings are exactly the ones training conditioned on."""
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").exists():
        sys.exit(f"refusing to replace {out}: it is not empty and holds no model")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to("cpu")
    pipe.transformer.to(dtype)
    pipe.vae.to(dtype)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    write_checksums(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"saved {out} ({sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 1e6:.1f} MB)", flush=True)


def evaluate(folder: Path, device: str, sheet: Path | None = None) -> None:
    """Held-out prompts and every preset through the project's Engine; prints what the tests measure and
    saves the pictures, scaled to 128 pixels high, side by side in `sheet`."""
    from ..engine import Engine
    from ..request import GenerationRequest
    from ..settings import Settings
    from . import measure

    engine = Engine.create(Settings(model=str(folder), device=device, dtype="fp32", compile="off", warmup="off"))
    engine.mark_ready()
    thumbnails = []

    def show(label: str, scene, **request):
        image = engine.generate(GenerationRequest(prompt=label, **request)).images[0]
        print(f"{request}  {label!r}: {measure.read(image, scene).summary()}", flush=True)
        thumbnails.append(image.resize((max(1, image.width * 128 // image.height), 128)))
        return image

    held_out = scenes.held_out_scenes()
    for scene in held_out + scenes.EXAMPLE_SCENES[3:4]:
        english = show(scene.english(), scene, width=256, height=256, steps=8, seed=0)
        chinese = show(scene.chinese(), scene, width=256, height=256, steps=8, seed=0)
        print(f"    twins agree on {measure.agreement(english, chinese):.3f} of pixels", flush=True)
    for i, tier in enumerate(presets.TIERS):
        for steps in sorted({3, presets.TIERS[tier].steps}):
            scene = held_out[i % len(held_out)]
            show(scene.english(), scene, preset=tier, aspect="1:1", steps=steps, seed=0)
    for i, aspect in enumerate(presets.ASPECTS):
        show(held_out[i % len(held_out)].english(), held_out[i % len(held_out)], preset="Draft", aspect=aspect, seed=0)
    show(held_out[1].english(), held_out[1], preset="Ultra", aspect="21:9", seed=0)
    if sheet:
        import PIL.Image

        rows = [thumbnails[i:i + 8] for i in range(0, len(thumbnails), 8)]
        canvas = PIL.Image.new("RGB", (max(sum(t.width for t in row) for row in rows), 128 * len(rows)), "gray")
        for y, row in enumerate(rows):
            x = 0
            for t in row:
                canvas.paste(t, (x, 128 * y))
                x += t.width
        canvas.save(sheet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to write (replaced if it holds one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--smoke", action="store_true", help="a few steps on 64x64 images: checks the wiring only")
    parser.add_argument("--resume", type=Path, help="start from this model folder's VAE (kept) and transformer")
    parser.add_argument("--vae-steps", type=int, default=3000, help="VAE steps (or --vae-time-limit, if sooner)")
    parser.add_argument("--vae-time-limit", type=float, default=50.0, help="seconds for the VAE phase")
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=4e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-6)
    parser.add_argument("--steps", type=int, default=20000, help="transformer steps (or --time-limit, if sooner)")
    parser.add_argument("--time-limit", type=float, default=255.0, help="seconds for the transformer phase")
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--batch-tokens", type=int, default=12288, help="image tokens per transformer batch")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--sigma-one", type=float, default=SIGMA_ONE_FRACTION,
                        help="fraction of transformer samples at sigma 1 (pure noise)")
    parser.add_argument("--preset-fraction", type=float, default=PRESET_FRACTION,
                        help="fraction of transformer batches at a preset's size")
    parser.add_argument("--size-256-fraction", type=float, default=SIZE_256_FRACTION,
                        help="fraction at 256x256 (the rest: custom sizes from 256² to 640² in area)")
    parser.add_argument("--warmup", type=int, default=200, help="transformer warm-up steps")
    parser.add_argument("--log-every", type=int, default=200)
    parser.add_argument("--size", type=lambda v: tuple(int(x) for x in v.split("x")), metavar="WxH",
                        help="train at this one size only (quick CPU trials) instead of the size mix")
    parser.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16", help="dtype of the saved weights")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--sheet", type=Path, help="save the evaluation's pictures side by side in this PNG")
    args = parser.parse_args(argv)
    args.vae_sizes = [args.size] if args.size else VAE_SIZES
    if args.smoke:
        args.vae_steps, args.vae_batch, args.vae_sizes, args.size = 2, 2, [(64, 64)], (64, 64)
        args.steps, args.max_batch, args.log_every, args.no_eval = 3, 2, 1, True
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rng = random.Random(args.seed)
    started = time.perf_counter()

    pipe = build_untrained(args.seed)
    if args.resume:  # trained parts from the folder; tokenizer and text encoder are the recipe's, not trained
        from diffusers import AutoencoderKL, ZImageTransformer2DModel

        pipe.register_modules(vae=AutoencoderKL.from_pretrained(args.resume / "vae"),
                              transformer=ZImageTransformer2DModel.from_pretrained(args.resume / "transformer"))
        args.vae_steps = 0
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    pipe.text_encoder.requires_grad_(False)
    vae_losses = []
    if args.vae_steps:
        vae_losses = train_vae(pipe.vae, args, rng, device)
        set_latent_normalisation(pipe.vae, rng, device, batches=2 if args.smoke else 20)
    pipe.vae.eval().requires_grad_(False)
    losses = train_transformer(pipe, args, rng, device)

    info = {"command": "python -m zimage.demo.train " + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed, "resumed_from": resumed_from(args.resume),
            "vae_steps": len(vae_losses),
            "vae_final_loss": round(sum(vae_losses[-100:]) / len(vae_losses[-100:]), 5) if vae_losses else None,
            "transformer_steps": len(losses), "transformer_final_loss": round(sum(losses[-200:]) / len(losses[-200:]), 5),
            "vae_time_limit": args.vae_time_limit, "time_limit": args.time_limit,
            "save_dtype": args.save_dtype, "seconds": round(time.perf_counter() - started),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    save(pipe, args.out, info, torch.float16 if args.save_dtype == "fp16" else torch.float32)
    if not args.no_eval:
        evaluate(args.out, args.device, args.sheet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
