"""A tiny random-weight Z-Image model built offline from the real classes.

Same architecture family as Z-Image-Turbo (Qwen3 text encoder, 16-channel AutoencoderKL with 8x
downsampling, single-stream ZImageTransformer2DModel, byte-level BPE tokenizer with a Qwen-style chat
template), small enough to run the real `ZImagePipeline` on a CPU in well under a second. It is saved with
`save_pretrained` into a cache folder once and then loaded through `from_pretrained`, like real weights.
Everything is seeded: building twice gives byte-identical files (tests check this).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when the recipe below changes, so caches built by an older recipe are not reused.
RECIPE_VERSION = "tiny-random-v1"
SEED = 20251123

# Words the tokenizer learns merges for. Byte-level BPE encodes any text; this only shapes the merges.
_CORPUS = [
    "a red circle on a blue background", "a green square on a white background", "a yellow triangle",
    "a black star on the left", "a white circle at the top", "a small blue square at the bottom right",
    "a large orange heart in the centre", "two circles, one red and one green", "purple and pink stripes",
    "A cinematic photograph of a mountain lake at sunrise, mist, soft light, 35mm, highly detailed",
    "portrait of an old fisherman, dramatic lighting, film grain", "a cat sleeping on a windowsill",
    "蓝色背景上的红色圆形", "白色背景上的绿色正方形", "左边的黑色星星", "一只猫在窗台上睡觉", "日出时的山湖，薄雾",
    "一幅中国水墨画，远山与小船", "城市夜景，霓虹灯，雨后的街道",
]
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's template reduced to what ZImagePipeline uses: one user turn, then the assistant prefix.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Component configs: small widths, real structure (VAE /8, 16 latent channels, patch 2, head_dim = sum(axes)).
TEXT_ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rope_theta=1e6,
                    tie_word_embeddings=True)
TRANSFORMER = dict(dim=96, n_layers=2, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=64,
                   axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512])
VAE = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           block_out_channels=[16, 16, 32, 32], layers_per_block=1, latent_channels=16, norm_num_groups=8,
           sample_size=256, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
           use_post_quant_conv=False, force_upcast=True)


def build_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None, split_cjk: bool = False):
    """Byte-level BPE whose merges come from `corpus` (default: the tiny model's own sentences).

    `split_cjk` makes every CJK character (and full-width punctuation) its own pre-token, so merges never
    span characters: "红色圆形" becomes 红 色 圆 形, not arbitrary chunks like "色圆形".
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_cjk:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex("[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]"), behavior="isolated"),
            tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS if corpus is None else corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=32768)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_pipeline(seed: int = SEED):
    """The tiny pipeline with seeded random weights, on CPU in fp32."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), **TEXT_ENCODER)).eval()
    torch.manual_seed(seed + 1)
    transformer = ZImageTransformer2DModel(**TRANSFORMER).eval()
    # diffusers leaves some weights at zero (pad tokens, adaLN); give every matrix trained-like scale so the
    # random model's output depends on prompt, seed and steps and bugs in the wiring show up in pixels.
    with torch.no_grad():
        for p in transformer.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.05)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**VAE).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


def recipe_digest() -> str:
    recipe = dict(version=RECIPE_VERSION, seed=SEED, te=TEXT_ENCODER, tf=TRANSFORMER, vae=VAE,
                  corpus=_CORPUS, template=CHAT_TEMPLATE)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def save(folder: Path, seed: int = SEED) -> Path:
    """Build and save into `folder` (created). Returns the folder."""
    pipe = build_pipeline(seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def ensure_tiny_model(cache_dir: Path) -> Path:
    """The tiny model's folder under `cache_dir`, building it there first if missing.

    Built into a temporary sibling and renamed, so a crash or a concurrent builder never leaves a
    half-written model behind.
    """
    target = Path(cache_dir) / f"tiny-random-{recipe_digest()}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        save(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: its copy is identical
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
