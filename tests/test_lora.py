"""LoRAs (zimage/lora.py) on the real ZImagePipeline, CPU: the demo LoRA's measured effect on the demo model, the
same picture from every key layout, switching, isolation between concurrent requests, refusals, the folder
rescan, metadata; and on the compiled CPU engine, no recompilation when LoRAs switch."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import generate
from zimage import images, lora
from zimage.appprocess import ROOT
from zimage.demo import measure
from zimage.demo import train_lora
from zimage.demo.train_lora import EVAL_SCENES
from zimage.engine import Engine
from zimage.request import GenerationRequest, RequestError

DEMO_LORAS = ROOT / "models" / "tiny-demo-loras"
FIXTURES = ROOT / "tests" / "fixtures" / "loras"
LAYOUTS = ("negative", "negative-kohya", "negative-comfyui", "negative-comfyui-qkv")
SMALL = dict(width=256, height=256, steps=2)


def pixels(result, i=0):
    return np.asarray(result.images[i])


def random_lora(path, transformer_shapes: dict, rank: int, seed: int, targets=("attention.to_", "feed_forward.w"),
                std: float = 0.3) -> None:
    """A random LoRA in diffusers' layout over the layers real LoRAs train (for switching and isolation tests)."""
    from diffusers import ZImagePipeline

    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (n_in, n_out) in sorted(transformer_shapes.items()):
        if any(t in name for t in targets):
            weights[f"{name}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            weights[f"{name}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * std / rank ** 0.5
    ZImagePipeline.save_lora_weights(path.parent, transformer_lora_layers=weights, weight_name=path.name)


def linear_shapes(model_folder) -> dict:
    from diffusers import ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel.from_pretrained(model_folder / "transformer")
    return {n: (m.in_features, m.out_features) for n, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, cache_dir):
    """The demo LoRA in its four layouts, two random LoRAs for the demo model, and files that are not usable."""
    from zimage import tiny

    folder = tmp_path_factory.mktemp("loras")
    for name in LAYOUTS:
        shutil.copy((DEMO_LORAS if name == "negative" else FIXTURES) / f"{name}.safetensors", folder)
    shapes = linear_shapes(ROOT / "models" / "tiny-demo")
    random_lora(folder / "speckle.safetensors", shapes, rank=4, seed=1)
    random_lora(folder / "smear.safetensors", shapes, rank=6, seed=2)
    random_lora(folder / "wide.safetensors", shapes, rank=60, seed=3)
    (folder / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": not json}")
    save_file({"layers.0.attention.to_q.weight": torch.zeros(8, 8)}, str(folder / "checkpoint.safetensors"))
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)},
              str(folder / "sdxl-style.safetensors"))
    random_lora(folder / "tiny-random-width.safetensors", linear_shapes(tiny.ensure_tiny_model(cache_dir)), 4, 5)
    (folder / "notes.txt").write_text("not a LoRA: ignored")
    return folder


@pytest.fixture(scope="module")
def demo_engine(lora_dir, tiny_settings):
    engine = Engine.create(tiny_settings.replace(model="tiny", lora_dir=lora_dir))
    engine.mark_ready()
    return engine


@pytest.fixture(scope="module")
def fresh_engine(lora_dir, tiny_settings):
    """Another engine on the same folder: each call is a fresh engine whose slots never held anything."""

    def make() -> Engine:
        engine = Engine.create(tiny_settings.replace(model="tiny", lora_dir=lora_dir))
        engine.mark_ready()
        return engine

    return make


def test_listing_names_every_file_and_why_it_cannot_be_used(demo_engine):
    listing = {e["name"]: e for e in demo_engine.list_loras()}
    assert set(listing) == {*LAYOUTS, "speckle", "smear", "wide", "junk", "checkpoint", "sdxl-style",
                            "tiny-random-width"}
    for name in LAYOUTS:
        entry = listing[name]
        assert entry["ok"] and entry["rank"] == 8 and entry["modules"] == 35, entry
        assert entry["targets"] == ["attention.to_k", "attention.to_out.0", "attention.to_q", "attention.to_v",
                                    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    assert [listing[n]["layout"] for n in LAYOUTS] == ["diffusers", "kohya", "comfyui", "comfyui"]
    assert "safetensors" in listing["junk"]["error"]
    assert "not a LoRA" in listing["checkpoint"]["error"] and "checkpoint" in listing["checkpoint"]["error"]
    assert "not a LoRA for this model" in listing["sdxl-style"]["error"]
    assert "another model size" in listing["tiny-random-width"]["error"]
    assert not any(listing[n]["ok"] for n in ("junk", "checkpoint", "sdxl-style", "tiny-random-width"))


def test_demo_lora_turns_every_colour_into_its_opposite_measured(demo_engine):
    """The demo LoRA's effect, measured by measure.read (the palette colour of each pixel) on four single-shape
    scenes, 256x256, 8 steps, seed 0 -- the numbers training.json records. Without it the picture is the prompt's
    (border in the background colour 0.96-1.00, shape core 1.00); with it every colour is its opposite
    (train_lora.COMPLEMENT): the border turns to the background's opposite (measured 0.96-1.00) and neither the
    prompt's background nor its shape colour is left where they were (0.00). Two of the four scenes here, to keep
    CI short; the other two measure the same (negative.training.json)."""
    opposite_cores = 0
    for scene in EVAL_SCENES[1::2]:  # a circle and a square, a light and a dark background (all four: training.json)
        request = dict(prompt=scene.english(), width=256, height=256, steps=8, seed=0)
        base = generate(demo_engine, GenerationRequest(**request)).images[0]
        styled = generate(demo_engine, GenerationRequest(loras=[{"name": "negative", "scale": 1.0}], **request)).images[0]
        plain, flipped = measure.read(base, scene), measure.read(styled, train_lora.styled(scene, "negative"))
        assert plain.border_fraction >= 0.9 and plain.shapes[0].core_fraction >= 0.9, plain.summary()
        assert measure.read(base, train_lora.styled(scene, "negative")).border_fraction <= 0.05
        assert flipped.border_fraction >= 0.9, (scene.english(), flipped.summary())
        after = measure.read(styled, scene)
        assert after.border_fraction <= 0.05 and after.shapes[0].core_fraction <= 0.05, (scene.english(),
                                                                                          after.summary())
        opposite_cores += flipped.shapes[0].core_fraction >= 0.9
    assert opposite_cores >= 1  # measured: the squares land on the opposite palette colour exactly (1.00, 1.00)


def test_scale_zero_and_the_zero_branch_equal_no_lora_bit_exact(demo_engine):
    plain = generate(demo_engine, GenerationRequest("a red circle on a blue background", seed=3, **SMALL))
    zero = generate(demo_engine, GenerationRequest("a red circle on a blue background", seed=3,
                                                   loras=[{"name": "negative", "scale": 0}], **SMALL))
    assert np.array_equal(pixels(plain), pixels(zero))
    assert zero.loras == [{"name": "negative", "scale": 0.0, "hash": zero.loras[0]["hash"],
                           "sha256": zero.loras[0]["sha256"]}]
    # The LoRA branch itself with all-zero slots (what warm-up compiles) adds exactly nothing either.
    with demo_engine.loras.warming():
        branch = generate(demo_engine, GenerationRequest("a red circle on a blue background", seed=3, **SMALL))
    assert np.array_equal(pixels(plain), pixels(branch))
    # ... and one LoRA at 0 beside another is that other alone.
    one = generate(demo_engine, GenerationRequest("a red circle on a blue background", seed=3, loras="speckle:0.7",
                                                  **SMALL))
    both = generate(demo_engine, GenerationRequest("a red circle on a blue background", seed=3,
                                                   loras="speckle:0.7, smear:0", **SMALL))
    assert np.array_equal(pixels(one), pixels(both)) and not np.array_equal(pixels(one), pixels(plain))


def test_every_key_layout_draws_the_same_picture(demo_engine):
    """diffusers/peft, kohya/musubi, ComfyUI (diffusion_model.*) and ComfyUI with fused qkv (musubi's converter):
    all read through diffusers' conversion, all the same numbers, so the same pixels."""
    request = dict(prompt="a black square on the left on a white background", seed=11, **SMALL)
    results = [generate(demo_engine, GenerationRequest(loras=[{"name": name, "scale": 0.9}], **request))
               for name in LAYOUTS]
    plain = generate(demo_engine, GenerationRequest(**request))
    assert not np.array_equal(pixels(results[0]), pixels(plain))
    for name, result in zip(LAYOUTS[1:], results[1:]):
        assert np.array_equal(pixels(result), pixels(results[0])), name
    hashes = {r.loras[0]["name"]: r.loras[0]["hash"] for r in results}
    assert len(set(hashes.values())) >= 2  # the files differ (their hashes say so), the pictures do not


def test_switching_a_b_none_a_gives_the_pixels_of_fresh_runs(demo_engine, fresh_engine):
    """A -> B -> none -> A -> A+B on one engine: each picture is the one an engine whose LoRA slots never held
    anything else draws."""
    def run(engine, loras):
        return pixels(generate(engine, GenerationRequest("a yellow circle on the right on a purple background",
                                                         seed=5, loras=loras, **SMALL)))

    first = fresh_engine()
    fresh = {"none": run(first, None), "A": run(first, "speckle")}
    fresh.update({key: run(fresh_engine(), loras) for key, loras in (("B", "smear:1.5"),
                                                                     ("AB", "speckle:0.5, smear:-1"))})
    for key, loras in [("A", "speckle"), ("B", "smear:1.5"), ("none", None), ("A", "speckle"),
                       ("AB", "speckle:0.5, smear:-1")]:
        assert np.array_equal(run(demo_engine, loras), fresh[key]), (key, loras)
    assert len({fresh[k].tobytes() for k in fresh}) == 4


def test_concurrent_requests_with_different_loras_never_leak(demo_engine):
    specs = [None, "speckle", "smear:1.5", "speckle:0.5, smear:-1, negative:0.8"]
    reference = {spec: pixels(generate(demo_engine, GenerationRequest("a red circle", seed=9, loras=spec, **SMALL)))
                 for spec in specs}
    results, errors = {}, []

    def worker(i, spec):
        try:
            results[i] = pixels(generate(demo_engine, GenerationRequest("a red circle", seed=9, loras=spec, **SMALL)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, specs[i % len(specs)])) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert demo_engine.stats.max_waiting >= 2  # they did wait for each other
    for i in range(8):
        assert np.array_equal(results[i], reference[specs[i % len(specs)]]), specs[i % len(specs)]


@pytest.mark.parametrize("request_fields, param, message", [
    (dict(loras=[{"name": "nope", "scale": 1}]), "loras", "unknown LoRA 'nope'"),
    (dict(loras=[{"name": "../negative", "scale": 1}]), "loras", "looks like a path"),
    (dict(loras=[{"name": "/etc/passwd"}]), "loras", "looks like a path"),
    (dict(loras=[{"name": "negative", "scale": 5}]), "loras", "scale 5 is out of range: use -4 to 4"),
    (dict(loras=[{"name": "negative", "scale": "strong"}]), "loras", "must be a number"),
    (dict(loras="negative, speckle, smear, negative-kohya, negative-comfyui"), "loras", "at most 4 per request"),
    (dict(loras="junk"), "loras", "LoRA 'junk' cannot be used: not a readable safetensors file"),
    (dict(loras="sdxl-style"), "loras", "not a LoRA for this model"),
    (dict(loras="wide, negative"), "loras", "rank 68 together; this server applies up to rank 64"),
    (dict(loras="negative, negative:0.5"), "loras", "given twice"),
    (dict(prompt="a cat <lora:nope:1>"), "prompt", "unknown LoRA 'nope'"),
    (dict(prompt="a cat <lora:negative:9>"), "prompt", "scale 9 is out of range"),
    (dict(prompt="a cat <lora:negative:1:0.5>"), "prompt", "one scale"),
    (dict(prompt="<lora:negative:1>"), "prompt", "besides the <lora:...> tags"),
    (dict(loras=42), "loras", "must be a list"),
])
def test_bad_loras_are_refused_with_a_message(demo_engine, request_fields, param, message):
    fields = {"prompt": "a cat", **SMALL, **request_fields}
    with pytest.raises(RequestError, match=re.escape(message)) as info:
        generate(demo_engine, GenerationRequest(**fields))
    assert info.value.param == param


def test_a_refused_or_broken_lora_never_breaks_the_next_request(demo_engine):
    for bad in ("junk", "checkpoint", "nope", "wide, negative"):
        with pytest.raises(RequestError):
            generate(demo_engine, GenerationRequest("a cat", loras=bad, **SMALL))
    assert generate(demo_engine, GenerationRequest("a cat", loras="negative:0.5", **SMALL)).loras[0]["name"] == \
        "negative"
    assert len(demo_engine.list_loras()) == 11


def test_prompt_tags_are_the_loras_field(demo_engine):
    tagged = generate(demo_engine, GenerationRequest("a red circle <lora:speckle:0.6> on a blue background <lora:smear>",
                                                     seed=2, **SMALL))
    field = generate(demo_engine, GenerationRequest("a red circle on a blue background", seed=2,
                                                    loras=[{"name": "speckle", "scale": 0.6}, ("smear", 1)], **SMALL))
    assert tagged.prompt == "a red circle on a blue background"
    assert np.array_equal(pixels(tagged), pixels(field))
    assert [(e["name"], e["scale"]) for e in tagged.loras] == [("speckle", 0.6), ("smear", 1.0)]


def test_folder_is_rescanned_new_changed_and_removed_files(demo_engine, lora_dir):
    names = {e["name"] for e in demo_engine.list_loras()}
    assert "late" not in names
    shutil.copy(lora_dir / "speckle.safetensors", lora_dir / "late.safetensors")
    try:
        entry = next(e for e in demo_engine.list_loras() if e["name"] == "late")
        assert entry["ok"] and entry["rank"] == 4
        a = generate(demo_engine, GenerationRequest("a red circle", seed=4, loras="late", **SMALL))
        assert np.array_equal(pixels(a), pixels(generate(demo_engine, GenerationRequest(
            "a red circle", seed=4, loras="speckle", **SMALL))))
        shutil.copy(lora_dir / "smear.safetensors", lora_dir / "late.safetensors")  # replaced: new contents used
        b = generate(demo_engine, GenerationRequest("a red circle", seed=4, loras="late", **SMALL))
        assert np.array_equal(pixels(b), pixels(generate(demo_engine, GenerationRequest(
            "a red circle", seed=4, loras="smear", **SMALL))))
        assert b.loras[0]["sha256"] == hashlib.sha256((lora_dir / "smear.safetensors").read_bytes()).hexdigest()
    finally:
        (lora_dir / "late.safetensors").unlink()
    with pytest.raises(RequestError, match="unknown LoRA 'late'"):
        generate(demo_engine, GenerationRequest("a red circle", loras="late", **SMALL))


def test_metadata_records_loras_a1111_style_and_reads_back(demo_engine, lora_dir):
    result = generate(demo_engine, GenerationRequest("a red circle", seed=8, loras="negative:0.8, speckle", **SMALL))
    data = (lora_dir / "negative.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    a1111_hash = hashlib.sha256(data[8 + header:]).hexdigest()[:12]  # A1111's "addnet" short hash
    assert result.loras[0] == {"name": "negative", "scale": 0.8, "hash": a1111_hash,
                               "sha256": hashlib.sha256(data).hexdigest()}
    meta = images.metadata(result, result.seeds[0], "tiny")
    text = images.parameters_text(meta)
    assert text.startswith("a red circle <lora:negative:0.8> <lora:speckle:1>\nSteps: 2")
    assert f'Lora hashes: "negative: {a1111_hash}, speckle: {result.loras[1]["hash"]}"' in text
    png = images.png_bytes(result.images[0], meta)
    assert images.read_parameters(png)["loras"] == result.loras  # our JSON chunk
    parsed = images.parse_parameters_text(text)  # an A1111-only reader's view
    assert parsed["prompt"] == "a red circle" and parsed["seed"] == 8
    assert parsed["loras"] == [{"name": "negative", "scale": 0.8, "hash": a1111_hash},
                               {"name": "speckle", "scale": 1.0, "hash": result.loras[1]["hash"]}]
    json.dumps(meta)


def test_lora_off_settings_refuse_loras(tiny_settings, lora_dir):
    engine = Engine.create(tiny_settings.replace(lora_dir=lora_dir, lora_rank=0))
    engine.mark_ready()
    assert engine.loras is None and engine.describe()["lora"] is None
    with pytest.raises(RequestError, match="LoRAs are turned off"):
        generate(engine, GenerationRequest("a cat", loras="negative", **SMALL))
    plain = generate(engine, GenerationRequest("a cat", seed=1, **SMALL))
    assert plain.loras == []


def test_alpha_and_layout_folding_agree(tmp_path):
    """lora_alpha != r: diffusers' metadata (peft's alpha / r) and kohya's .alpha give the same factors."""
    from diffusers import ZImagePipeline

    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 16, generator=g), torch.randn(32, 4, generator=g)
    ZImagePipeline.save_lora_weights(tmp_path, transformer_lora_layers={
        "layers.0.attention.to_q.lora_A.weight": down, "layers.0.attention.to_q.lora_B.weight": up},
        weight_name="d.safetensors", transformer_lora_adapter_metadata={"r": 4, "lora_alpha": 2})
    save_file({"lora_unet_layers_0_attention_to_q.lora_down.weight": down,
               "lora_unet_layers_0_attention_to_q.lora_up.weight": up,
               "lora_unet_layers_0_attention_to_q.alpha": torch.tensor(2.0)}, str(tmp_path / "k.safetensors"))
    library = lora.LoraLibrary(tmp_path)
    library.attach({"layers.0.attention.to_q": (16, 32)}, 64)
    d, k = library.load("d").weights["layers.0.attention.to_q"], library.load("k").weights["layers.0.attention.to_q"]
    assert torch.equal(d[0], k[0]) and torch.equal(d[1], k[1])
    assert torch.allclose(d[1] @ d[0], 0.5 * up @ down)


# ---- the compiled CPU engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled_engine(tmp_path_factory, tiny_settings, cache_dir):
    from zimage import tiny

    folder = tmp_path_factory.mktemp("compiled-loras")
    shapes = linear_shapes(tiny.ensure_tiny_model(cache_dir))
    random_lora(folder / "a.safetensors", shapes, rank=4, seed=1)
    random_lora(folder / "b.safetensors", shapes, rank=8, seed=2)
    engine = Engine.create(tiny_settings.replace(compile="on", lora_dir=folder,
                                                 cache_dir=tmp_path_factory.mktemp("compile-cache")))
    yield engine
    engine.close()
    torch.compiler.reset()


def test_compiled_engine_never_recompiles_when_loras_switch(compiled_engine):
    """Warm-up compiles the block graph with and without the LoRA branch (the folder holds LoRAs); after it,
    LoRA requests -- first use, switches, two at once, none again, another size -- compile nothing."""
    from torch._dynamo.utils import counters

    report = compiled_engine.warm_up([("Draft", "1:1", 1)])
    assert [bool(e.get("lora_branch")) for e in report] == [False, True]
    assert compiled_engine.compiled

    def graphs():
        return counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())

    warm = graphs()
    seen = {}
    for spec in [None, "a", "b", None, "a:0.5, b:-1", "a", "b:2", None, "a"]:
        image = pixels(generate(compiled_engine, GenerationRequest("a red circle", seed=1, loras=spec, **SMALL)))
        if spec in seen:
            assert np.array_equal(image, seen[spec]), spec  # the same pixels after switching away and back
        seen[spec] = image
    generate(compiled_engine, GenerationRequest("a red circle", seed=1, loras="b", width=320, height=256, steps=2))
    assert graphs() == warm, (warm, graphs())
    assert len({v.tobytes() for v in seen.values()}) == 5


def test_merge_mode_adds_loras_into_the_weights_and_takes_them_out_exactly(demo_engine, lora_dir, tiny_settings):
    """--lora-mode merge: W0 + scale * up @ down in the weights per request, W0 back bit for bit without LoRAs;
    the same picture as the branch (to float rounding), no branch ever runs."""
    engine = Engine.create(tiny_settings.replace(model="tiny", lora_dir=lora_dir, lora_mode="merge"))
    engine.mark_ready()
    assert engine.describe()["lora"]["mode"] == "merge" and engine.loras.slot_bytes == 0
    originals = {name: w.base.weight.detach().clone() for name, w in engine.loras.wrappers.items()}

    def run(eng, loras):
        return pixels(generate(eng, GenerationRequest("a black square on the left on a white background", seed=6,
                                                      loras=loras, **SMALL)))

    plain = run(engine, None)
    assert np.array_equal(plain, run(demo_engine, None))
    merged = {spec: run(engine, spec) for spec in ("negative", "speckle:0.5, wide:0.3")}
    for spec, image in merged.items():
        branch = run(demo_engine, spec)
        assert np.abs(image.astype(int) - branch.astype(int)).max() <= 2, spec  # fp32 sums in another order
        assert not np.array_equal(image, plain)
    for spec in (None, "negative", "speckle:0.5, wide:0.3", None):
        assert np.array_equal(run(engine, spec), plain if spec is None else merged[spec]), spec
        # W0 is kept only for the layers that hold a LoRA: without LoRAs merge mode holds no copy at all
        held = engine.describe()["lora"]["weight_copy_held_mib"]
        assert (held == 0 and not engine.loras.masters) if spec is None else (held > 0 and engine.loras.masters)
    assert all(torch.equal(w.base.weight, originals[name]) for name, w in engine.loras.wrappers.items())
    assert not any(w.active for w in engine.loras.wrappers.values())


def test_streamed_profile_applies_loras_the_same(lora_dir, tiny_settings, monkeypatch):
    """The 12gb profile streams the transformer's layers (diffusers group offloading); the LoRA branch's buffers stay
    resident beside them, and the pictures are the full profile's. (The full profile here without fused
    projections, which a streamed transformer cannot have: other GEMM shapes round differently.)"""
    engine = Engine.create(tiny_settings.replace(model="tiny", lora_dir=lora_dir, memory_profile="12gb"))
    engine.mark_ready()
    assert engine.placement.profile.transformer_streamed and "fused_projections" not in engine.speed_switches
    monkeypatch.setenv("ZIMAGE_SPEED", os.environ.get("ZIMAGE_SPEED", "") + ",-fused_projections")
    full = Engine.create(tiny_settings.replace(model="tiny", lora_dir=lora_dir))
    full.mark_ready()
    for spec in ("negative:0.7, speckle", None):
        request = GenerationRequest("a red circle on a blue background", seed=2, loras=spec, **SMALL)
        assert np.array_equal(pixels(generate(engine, request)), pixels(generate(full, request))), spec


def test_fp8_layers_take_loras_by_branch_and_by_merge(lora_dir, tiny_settings, monkeypatch):
    """fp8 (fp8.Fp8Linear: e4m3 rows, `_scaled_mm`, which runs on CPU too) in bf16 on the demo model: the branch
    leaves the fp8 weights untouched and adds a bf16 matmul; merge dequantizes, adds and quantizes again, and
    restores the saved rows exactly. Both change the picture the same way, scale 0 is no LoRA."""
    from zimage import fp8, speed

    monkeypatch.setattr(speed, "fp8_supported", lambda device: True)
    engines = {}
    for mode in ("branch", "merge"):
        engines[mode] = Engine.create(tiny_settings.replace(model="tiny", lora_dir=lora_dir, dtype="bf16", fp8="on",
                                                            lora_mode=mode))
        engines[mode].mark_ready()
    branch, merge = engines["branch"], engines["merge"]
    assert isinstance(branch.loras.wrappers["layers.0.attention.to_q"].base, fp8.Fp8Linear)
    saved = {n: w.base.weight.detach().clone() for n, w in merge.loras.wrappers.items()}

    def run(engine, loras):
        return pixels(generate(engine, GenerationRequest("a large red circle on a blue background", seed=4,
                                                         loras=loras, **SMALL))).astype(int)

    plain = run(branch, None)
    assert np.array_equal(run(merge, None), plain)
    assert np.array_equal(run(branch, "negative:0"), plain)
    by_branch, by_merge = run(branch, "negative"), run(merge, "negative")
    effect = np.abs(by_branch - plain).mean()
    assert effect > 3, effect
    assert np.abs(by_merge - by_branch).mean() < 0.25 * effect, (np.abs(by_merge - by_branch).mean(), effect)
    assert np.array_equal(run(merge, None), plain) and np.array_equal(run(branch, None), plain)
    assert all(torch.equal(w.base.weight, saved[n]) for n, w in merge.loras.wrappers.items())


def test_lora_memory_is_counted_and_the_cache_gets_what_is_left(lora_dir, tiny_settings, monkeypatch):
    """On a (pretend) 16 GiB card with the 16gb fp8 profile: the slots count in every refusal, the device cache gets
    what is left beside the largest tier, and merge mode's weight copy, which cannot fit, stops start-up."""
    from zimage import memory

    monkeypatch.setattr(memory, "usable_gib", lambda device: 16.0)
    engine = Engine(tiny_settings.replace(model="tiny", lora_dir=lora_dir, memory_profile="16gb"))
    engine.fp8 = True
    monkeypatch.setattr("zimage.speed.fp8_wanted", lambda *a: True)
    monkeypatch.setattr(memory.Placement, "place", lambda self: None)  # a CPU model: nothing to quantize or move
    engine.load()
    resident = engine.loras.resident_bytes() / 2**30
    room = 16.0 - memory.HEADROOM_GIB - resident - max(memory.EXPECTED_PEAK_GIB[("16gb", True)].values())
    assert engine.lora_reserve_gib == pytest.approx(resident)
    assert engine.loras.cache_bytes == int(min(1024, room * 1024) * 2**20) < 1024 * 2**20
    big = Engine(tiny_settings.replace(model="tiny", lora_dir=lora_dir, memory_profile="16gb", lora_mode="merge",
                                       lora_cache_mib=64))
    monkeypatch.setattr(lora.LoraRuntime, "resident_bytes", lambda self: 6 * 2**30)
    with pytest.raises(RuntimeError, match="--lora-mode merge needs 6.0 GiB"):
        big.load()


@pytest.mark.parametrize("usable, fp8, expected", [(79.2, True, "merge"), (79.2, False, "merge"),
                                                   (23.6, True, "branch"), (31.4, False, "branch"),
                                                   (None, False, "branch")])
def test_auto_mode_merges_only_where_the_weight_copy_fits_beside_the_full_profile(
        lora_dir, tiny_settings, monkeypatch, usable, fp8, expected):
    """--lora-mode auto (the default): merge (no per-step cost) on a GPU with room for the copy of the weights beside
    every tier of the full profile (an H100; fp8 needs 23.9 GiB, bf16 35.4 GiB); branch on smaller cards and the CPU."""
    from zimage import memory

    monkeypatch.setattr(memory, "usable_gib", lambda device: usable)
    monkeypatch.setattr("zimage.speed.fp8_wanted", lambda *a: fp8)
    monkeypatch.setattr(memory.Placement, "place", lambda self: None)  # a CPU model: nothing to quantize or move
    engine = Engine(tiny_settings.replace(model="tiny", lora_dir=lora_dir))
    assert engine.settings.lora_mode == "auto"
    engine.load()
    assert engine.loras.mode == engine.describe()["lora"]["mode"] == expected
    assert engine.lora_reserve_gib == (0.0 if usable is None else pytest.approx(engine.loras.resident_bytes() / 2**30))
    engine.close()
