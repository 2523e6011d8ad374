"""The tiny model builds reproducibly offline; real-model loading fails loudly, never falling back."""

import hashlib
from pathlib import Path

import pytest

from zimage import loading, tiny
from zimage.settings import Settings


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_model_builds_twice_to_identical_files(tmp_path):
    a, b = tiny.save(tmp_path / "a"), tiny.save(tmp_path / "b")
    files = digest(a)
    assert files == digest(b)
    assert {"model_index.json", "transformer/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "tokenizer/tokenizer.json"} <= set(files)


def test_tiny_model_has_the_real_architecture_shape(shared_engine):
    pipe = shared_engine.pipeline
    assert type(pipe).__name__ == "ZImagePipeline"
    assert type(pipe.text_encoder).__name__ == "Qwen3Model"
    assert type(pipe.transformer).__name__ == "ZImageTransformer2DModel"
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    assert pipe.transformer.config.cap_feat_dim == pipe.text_encoder.config.hidden_size
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "猫"}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\n猫<|im_end|>\n<|im_start|>assistant\n"


def test_missing_local_folder_says_how_to_get_weights(tmp_path):
    settings = Settings(model=str(tmp_path / "no-such-model"), device="cpu", cache_dir=tmp_path)
    with pytest.raises(loading.ModelLoadError) as info:
        loading.load_pipeline(settings)
    msg = str(info.value)
    assert "model_index.json" in msg and "hf download Tongyi-MAI/Z-Image-Turbo" in msg and "--model tiny" in msg


def test_uncached_hub_id_offline_fails_without_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = Settings(model="Tongyi-MAI/Z-Image-Turbo", device="cpu", cache_dir=tmp_path)
    with pytest.raises(loading.ModelLoadError) as info:
        loading.load_pipeline(settings)
    msg = str(info.value)
    for needle in ("Tongyi-MAI/Z-Image-Turbo", "offline mode on", str(tmp_path / "hf"),
                   "hf download Tongyi-MAI/Z-Image-Turbo", "--model tiny"):
        assert needle in msg


def test_local_folder_loads_through_from_pretrained(cache_dir, tmp_path):
    folder = tiny.ensure_tiny_model(cache_dir)
    pipe = loading.load_pipeline(Settings(model=str(folder), device="cpu", cache_dir=tmp_path))
    assert type(pipe).__name__ == "ZImagePipeline"
