"""Compiled-artifact cache (zimage/compile_cache.py): key derivation, invalidation, corrupt files. CPU only:
torch's save/load functions are replaced by fakes that record what they were given."""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import pytest

from zimage import compile_cache

ENV = {"format": 1, "python": "3.12.0", "torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.5.0",
       "diffusers": "0.42.1", "transformers": "5.17.0", "torchao": "0.18.0", "flash_attn_4": None,
       "gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0"}
BASE = dict(device="cuda", model="Tongyi-MAI/Z-Image-Turbo", dtype="torch.bfloat16", fp8=True, attention="native",
            compile=True, memory_profile="full", switches={"real_rope": True, "vae_compile": True}, env=ENV)


def fields(**changes):
    args = {**BASE, **changes}
    return compile_cache.key_fields(**args)


class FakeTorch:
    """Stands in for torch.compiler.save/load_cache_artifacts."""

    def __init__(self, artifacts=(("inductor", "a"), ("pgo", "b"))):
        self.artifacts = list(artifacts)
        self.loaded: list[bytes] = []

    def info(self, keys):
        out = {}
        for kind, key in keys:
            out.setdefault(kind, []).append(key)
        return SimpleNamespace(artifacts=out)

    def save(self):
        return (b"BLOB:" + json.dumps(self.artifacts).encode(), self.info(self.artifacts))

    def load(self, data: bytes):
        if not data.startswith(b"BLOB:"):
            raise RuntimeError("bad magic")
        self.loaded.append(data)
        return self.info([tuple(k) for k in json.loads(data[5:])])


def test_key_is_stable_and_covers_every_field():
    key = compile_cache.derive_key(fields())
    assert key == compile_cache.derive_key(fields()) and len(key) == compile_cache.KEY_LENGTH
    changes = [dict(fp8=False), dict(attention="fa4"), dict(dtype="torch.float16"), dict(compile=False),
               dict(memory_profile="16gb"), dict(model="random-full"), dict(switches={"real_rope": False}),
               dict(env={**ENV, "torch": "2.12.0"}), dict(env={**ENV, "gpu": "NVIDIA H200"}),
               dict(env={**ENV, "capability": "8.9"}), dict(env={**ENV, "torchao": "0.19.0"}),
               dict(env={**ENV, "diffusers": "0.43.0"}), dict(env={**ENV, "transformers": "5.18.0"})]
    keys = {compile_cache.derive_key(fields(**c)) for c in changes}
    assert key not in keys and len(keys) == len(changes)


def test_environment_fields_on_cpu():
    env = compile_cache.environment_fields("cpu")
    assert env["gpu"] == "cpu" and env["torch"] and env["diffusers"]


def test_round_trip_saves_then_loads(tmp_path):
    fake = FakeTorch()
    state = compile_cache.prepare(tmp_path, fields(), load=fake.load)
    assert state.loaded_files == [] and fake.loaded == []
    assert compile_cache.store(state, save=fake.save) == "artifacts-0.bin"
    folder = tmp_path / "compiled" / state.key
    assert json.loads((folder / "key.json").read_text())["fp8"] is True
    # a restart with the same settings loads it, and has nothing new to save
    fresh = FakeTorch()
    state2 = compile_cache.prepare(tmp_path, fields(), load=fresh.load)
    assert state2.loaded_files == ["artifacts-0.bin"] and len(fresh.loaded) == 1
    assert compile_cache.store(state2, save=fresh.save) is None
    # a process that compiled a new shape adds a second blob; both load next time
    more = FakeTorch(artifacts=[("inductor", "a"), ("pgo", "b"), ("inductor", "c")])
    state3 = compile_cache.prepare(tmp_path, fields(), load=more.load)
    assert compile_cache.store(state3, save=more.save) == "artifacts-1.bin"
    last = FakeTorch()
    assert compile_cache.prepare(tmp_path, fields(), load=last.load).loaded_files == ["artifacts-0.bin",
                                                                                       "artifacts-1.bin"]


def test_other_settings_never_load_a_stale_blob(tmp_path):
    fake = FakeTorch()
    compile_cache.store(compile_cache.prepare(tmp_path, fields(), load=fake.load), save=fake.save)
    other = FakeTorch()
    state = compile_cache.prepare(tmp_path, fields(fp8=False), load=other.load)
    assert state.loaded_files == [] and other.loaded == []
    state = compile_cache.prepare(tmp_path, fields(env={**ENV, "torch": "2.12.0"}), load=other.load)
    assert state.loaded_files == [] and other.loaded == []


def test_key_json_mismatch_ignores_the_folder(tmp_path):
    fake = FakeTorch()
    state = compile_cache.prepare(tmp_path, fields(), load=fake.load)
    compile_cache.store(state, save=fake.save)
    key_file = state.folder / "key.json"
    key_file.write_text(json.dumps({**json.loads(key_file.read_text()), "fp8": False}))
    other = FakeTorch()
    state = compile_cache.prepare(tmp_path, fields(), load=other.load)
    assert other.loaded == [] and state.loaded_files == [] and "mismatch" in state.notes[0]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_meta", "torch_refuses"])
def test_corrupt_blob_is_logged_deleted_and_rebuilt(tmp_path, caplog, damage):
    fake = FakeTorch()
    state = compile_cache.prepare(tmp_path, fields(), load=fake.load)
    compile_cache.store(state, save=fake.save)
    blob = state.folder / "artifacts-0.bin"
    data = blob.read_bytes()
    if damage == "truncate":
        blob.write_bytes(data[:-3])
    elif damage == "flip":
        blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "no_meta":
        blob.with_suffix(".json").unlink()
    else:  # checksum fine, but torch cannot use it
        bad = b"JUNK" + data[4:]
        blob.write_bytes(bad)
        meta = json.loads(blob.with_suffix(".json").read_text())
        import hashlib

        meta.update(size=len(bad), sha256=hashlib.sha256(bad).hexdigest())
        blob.with_suffix(".json").write_text(json.dumps(meta))
    fresh = FakeTorch()
    with caplog.at_level(logging.WARNING, logger="zimage.compile_cache"):
        state = compile_cache.prepare(tmp_path, fields(), load=fresh.load)
    assert state.loaded_files == [] and fresh.loaded == []
    assert any("compile cache: ignoring artifacts-0.bin" in r.getMessage() for r in caplog.records)
    assert not blob.exists()
    # rebuilt after warm-up: saved again, loadable next time
    assert compile_cache.store(state, save=fresh.save) is not None
    assert compile_cache.prepare(tmp_path, fields(), load=FakeTorch().load).loaded_files


def test_store_never_raises(tmp_path):
    state = compile_cache.prepare(tmp_path / "x", fields(), load=FakeTorch().load)

    def broken():
        raise OSError("disk full")

    assert compile_cache.store(state, save=broken) is None and "save error" in state.notes[-1]
    assert compile_cache.store(None) is None
    assert compile_cache.store(state, save=lambda: None) is None


def test_engine_uses_the_cache_only_when_compiling(tiny_settings, tmp_path):
    """CPU engine (compile off by default): no artifacts folder appears, describe() lists the switches (the only
    ones not tied to CUDA or compiling: the fused projections and the caption refiner once per generation)."""
    from zimage.engine import Engine

    engine = Engine.create(tiny_settings.replace(cache_dir=tmp_path))
    engine.mark_ready()
    assert not (tmp_path / "compiled").exists()
    assert engine.describe()["speed_switches"] == ["fused_projections", "caption_once"]


RESTART_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
from torch._dynamo.utils import counters
from zimage.engine import Engine
from zimage.request import GenerationRequest
from zimage.settings import Settings
from tests.helpers import generate

engine = Engine(Settings(model="tiny-random", device="cpu", compile="on", cache_dir=Path(sys.argv[1]), warmup="off"))
engine.load()
engine.warm_up([("Draft", "1:1", 2)])
image = generate(engine, GenerationRequest("a red circle", width=256, height=256, steps=2, seed=3)).images[0]
print(json.dumps({"graphs": counters["stats"]["unique_graphs"], "hits": counters["dynamo_cache"]["dynamo_cache_hit"],
                  "notes": engine._compile_cache.notes, "pixels": np.asarray(image).sum().item(),
                  "packages": sorted(p.name for p in Path(sys.argv[1]).glob("compiled/*/dynamo/*"))}))
"""


def test_precompile_restart_traces_nothing_again(cache_dir, tmp_path):
    """With the precompile switch (on by default; off for the rest of the test suite), a restarted process loads
    the traced graphs from its key's folder: fewer Dynamo traces than the first start, the same pixels."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "cache"
    shutil.copytree(cache_dir, folder, ignore=shutil.ignore_patterns("compiled", "inductor"))
    env = {**os.environ, "ZIMAGE_SPEED": "+precompile", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", RESTART_SCRIPT, str(folder)], env=env, capture_output=True,
                             check=False, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, again = runs
    assert "precompile" in first["notes"] and first["graphs"] > 0 and first["packages"], first
    assert again["hits"] > 0 and again["graphs"] < first["graphs"], (first, again)
    assert again["pixels"] == first["pixels"]


def test_a_failed_start_with_precompile_deletes_the_packages(tiny_settings, tmp_path, monkeypatch):
    """torch 2.11 failed a restart while loading its own precompile packages (a TypeError, H100 2026-11-24). Should
    a torch we allow do the same, the packages go with the failed start, so the supervisor's restart traces as
    usual instead of failing again and again."""
    import torch
    from torch._dynamo import package

    from zimage import speed
    from zimage.engine import Engine, EngineState

    monkeypatch.setattr(compile_cache, "PRECOMPILE_TORCH", "0.0")  # whatever torch runs the tests
    monkeypatch.setenv("ZIMAGE_SPEED", "+precompile")
    engine = Engine(tiny_settings.replace(compile="on", cache_dir=tmp_path))

    def fails_like_torch_2_11(transformer, **kwargs):
        saved = engine._compile_cache.folder / "dynamo" / "package"
        saved.parent.mkdir(parents=True)
        saved.write_bytes(b"a package this torch cannot load")
        raise TypeError("DefaultsSource.__init__() takes from 3 to 4 positional arguments but 6 were given")

    monkeypatch.setattr(speed, "compile_transformer", fails_like_torch_2_11)
    # Process-wide torch state, put back by hand: pytest's monkeypatch would delete the config entry on undo
    # (it reads a module's __dict__, where torch's config values are not).
    try:
        with torch._dynamo.config.patch(caching_precompile=False), pytest.raises(TypeError):
            engine.start()
        assert engine.status().state is EngineState.FAILED
        assert "precompile" in engine._compile_cache.notes
        assert not (engine._compile_cache.folder / "dynamo").exists()
    finally:
        package.DynamoCache.__dict__.pop("path_prefix", None)  # back to the class's method
    assert not torch._dynamo.config.caching_precompile


def test_coldstart_reads_the_start_phases_from_the_engine_log(tiny_settings, caplog):
    """bench/coldstart.py reports where a start went from the app's log: the engine's loading phases and each warm-up
    shape's seconds, as the engine writes them (a real start of the tiny engine), and the compile phases line."""
    from bench.coldstart import phases_from_log
    from zimage.engine import Engine

    engine = Engine(tiny_settings.replace(warmup="on"))
    with caplog.at_level(logging.INFO, "zimage.engine"):
        engine.start()
    log = "\n".join(f"2026-12-02 11:35:54,445 INFO {r.name}: {r.getMessage()}" for r in caplog.records)
    log += "\n2026-12-02 11:35:57,273 INFO zimage.engine: warm-up compile time by phase (s): {'total': 16.95}"
    phases = phases_from_log(log)
    assert set(phases["loading_s"]) == {"model", "placement", "loras, compile set-up"}
    warm = engine.status().warm
    assert phases["warm_up_s"] == {f"{w['preset']} {w['aspect']} {w['width']}x{w['height']}": pytest.approx(
        w["seconds"], abs=0.01) for w in warm} and warm
    assert phases["compile_s"] == {"total": 16.95}
    assert phases_from_log("nothing here") == {}


def test_compiled_kernels_of_every_kind_live_in_the_cache_folder(tmp_path, monkeypatch):
    """Inductor's graphs and kernels and the hand-written Triton kernels' binaries all go under --cache-dir (a restart
    in a fresh container with the folder mounted loads them); folders the user chose stay."""
    from zimage import speed

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "placeholder")  # restored after the test, whatever use_compile_cache sets
        monkeypatch.delenv(name)
    speed.use_compile_cache(tmp_path / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "inductor" / "triton" / "0")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mine/inductor")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/mine/triton")
    speed.use_compile_cache(tmp_path / "other")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/mine/inductor" and os.environ["TRITON_CACHE_DIR"] == "/mine/triton"
