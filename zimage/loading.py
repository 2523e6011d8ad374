"""Getting a ZImagePipeline: real weights (Hugging Face id or local folder), the tiny offline model, or the
full-size architecture with random weights (for GPU benchmarks where no weights exist).

There is no silent fallback: if the weights asked for cannot be found, loading fails and says what was
tried and how to get them.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from . import demo, tiny
from .settings import Settings

log = logging.getLogger("zimage.loading")

TINY_NAMES = ("tiny", "tiny-random")
RANDOM_FULL = "random-full"

# The released Z-Image-Turbo architecture (docs/PERFORMANCE.md; diffusers 0.42.1 defaults plus the
# released axes_lens). Used only to build random weights of the true size.
TURBO_TRANSFORMER = dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
                         in_channels=16, rope_theta=256.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
TURBO_TEXT_ENCODER = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                          rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)
TURBO_VAE = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                 block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, sample_size=1024,
                 scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                 force_upcast=True)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what was tried and what to do."""


def describe(model: str) -> str:
    if model == "tiny":
        return "tiny offline demo model (coloured shapes on coloured backgrounds; English and Chinese prompts)"
    if model == "tiny-random":
        return "tiny model with random weights (tests)"
    if model == RANDOM_FULL:
        return "full-size Z-Image-Turbo architecture with random weights (benchmarks only)"
    return model


def quiet_libraries() -> None:
    """Progress bars and import chatter from diffusers/transformers/torchao are noise in a service log, and a
    new user reads it as errors. Call before diffusers is first imported."""
    # torchao registers Enum pytree constants that torch now deprecates (a warning per Enum at import), and
    # diffusers warns that torchao's old tensor classes are gone (they matter only for torchao checkpoints,
    # which this service never loads).
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torchao").setLevel(logging.ERROR)


def load_pipeline(settings: Settings, build_device: str = "cpu"):
    """The pipeline for `settings.model`, on CPU (the engine places it), in `settings.torch_dtype()`.

    random-full is built on `build_device`: the GPU when everything will be resident there anyway (10 B
    random parameters are created faster there than copied), the CPU when a memory profile streams parts.
    """
    quiet_libraries()
    from diffusers import ZImagePipeline

    model, dtype = settings.model, settings.torch_dtype()
    if model == "tiny":
        if not (demo.MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(f"--model tiny: the demo model is missing from {demo.MODEL_DIR} (it ships with the "
                                 "repository; restore it with git, or re-create it with `python -m zimage.demo.train`)")
        log.info("loading the demo model from %s", demo.MODEL_DIR)
        return ZImagePipeline.from_pretrained(demo.MODEL_DIR, dtype=dtype)
    if model == "tiny-random":
        folder = tiny.ensure_tiny_model(settings.cache_dir)
        log.info("loading tiny model from %s", folder)
        return ZImagePipeline.from_pretrained(folder, dtype=dtype)
    if model == RANDOM_FULL:
        return build_random_full(build_device, dtype)

    looks_like_path = model.startswith(("/", "./", "../", "~")) or os.path.isdir(model)
    if looks_like_path:
        folder = Path(model).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"--model {model!r}: no ZImagePipeline folder there (looked for {folder / 'model_index.json'}). "
                "Point --model at a folder made by `hf download Tongyi-MAI/Z-Image-Turbo --local-dir <folder>` "
                "or by save_pretrained, or use --model tiny for the offline demo.")
        source = str(folder)
    else:
        source = model
    log.info("loading %s (dtype %s)", source, dtype)
    try:
        return ZImagePipeline.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise ModelLoadError(
            f"could not load {model!r}: tried {'the local folder' if looks_like_path else 'the Hugging Face Hub id'} "
            f"{source!r} (HF_HOME={hf_home}, offline mode {'on' if offline else 'off'}); the weights are not "
            f"in the cache and could not be downloaded. Get them with `hf download {model}` on a machine with "
            "internet access (then copy HF_HOME, or pass the downloaded folder as --model), or run "
            f"`--model tiny` for an offline demo. Cause: {str(exc).splitlines()[0][:300]}") from exc


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random_full(device: str, dtype: torch.dtype):
    """Full-size Turbo architecture, random weights, in `dtype` on `device`.

    Same parameter count, FLOPs and bytes as the real model; the pixels mean nothing. Built on the meta
    device and then filled tensor by tensor: matrices N(0, 0.02) like trained nets (activations stay finite
    through 30 blocks), norm scales 1, biases 0. Random numbers come from the GPU when there is one, so a
    CPU-resident build (profiles that stream or quantize under a memory cap) takes seconds, not minutes,
    and never holds more than one tensor on the GPU. The tokenizer is the tiny BPE one: its ids stay below
    the full-size embedding table's.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with _default_dtype(dtype), torch.device("meta"):
        transformer = ZImageTransformer2DModel(**TURBO_TRANSFORMER).eval()
        vae = AutoencoderKL(**TURBO_VAE).eval()
        text_encoder = Qwen3Model(Qwen3Config(**TURBO_TEXT_ENCODER)).eval()
    rng_device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(rng_device).manual_seed(0)
    for module in (transformer, vae, text_encoder):
        module.to_empty(device=device)
        with torch.no_grad():
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if tensor.dim() >= 2:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator, device=rng_device,
                                             dtype=tensor.dtype).mul_(0.02))
                elif name.endswith("bias"):
                    tensor.zero_()
                elif tensor.is_floating_point():
                    tensor.fill_(1.0)
    # Buffers computed at construction (rotary inverse frequencies) were lost on the meta device.
    text_encoder.rotary_emb = type(text_encoder.rotary_emb)(text_encoder.config).to(device)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tiny.build_tokenizer(),
                          transformer=transformer)
