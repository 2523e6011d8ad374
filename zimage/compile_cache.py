"""Compiled artifacts kept in --cache-dir, so a restarted process loads instead of compiling.

torch.compile's caches (Inductor's compiled kernels and FX graphs, AOTAutograd graphs, autotuning results,
and Dynamo's profile-guided record of which dimensions turned dynamic) are serialised after warm-up with
`torch.compiler.save_cache_artifacts()` and put back before the next process compiles with
`torch.compiler.load_cache_artifacts()`. Dynamo still traces the Python code on a restart, but it knows the
dynamic dimensions up front (one trace instead of static-then-dynamic) and every backend compile is a hit.

Layout: cache_dir/compiled/<key>/
    key.json           the key's fields in clear (what the hash covers; read back and compared on load)
    artifacts-N.bin    one serialised blob per save (a later process that compiled new shapes adds a file)
    artifacts-N.json   its metadata: sha256 and size of the blob, the artifact keys it holds, when, by what

The key covers everything that changes the compiled code: GPU name and compute capability, CUDA, torch,
triton, diffusers, transformers and torchao versions, the model id, and the speed-relevant settings (dtype,
fp8, attention backend, compile on/off, memory profile, speed switches). Another key is another folder:
nothing stale is ever loaded. A blob whose checksum or metadata does not match, or that torch refuses, is
logged ("compile cache: ignoring ...") and deleted, and the process compiles as if it were absent.

The engine calls `prepare(...)` before it compiles (loads what is there) and `store(state)` after warm-up
(saves what is new). Both never raise: a cache problem costs compile time, never a failed start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger("zimage.compile_cache")

FORMAT = 2  # bump when the folder layout or what is stored changes (2: floats specialized, speed.use_compile_cache)
PRECOMPILE_TORCH = "2.13"  # the first torch whose Dynamo precompile packages restarted the engine (use_precompile)
KEY_LENGTH = 20  # hex digits of sha256 used as the folder name


@dataclasses.dataclass
class CacheState:
    """What prepare() found: the key, its folder, the blobs loaded and the artifact keys they held."""

    key: str
    fields: dict
    folder: Path
    loaded_files: list[str] = dataclasses.field(default_factory=list)
    loaded_artifacts: set = dataclasses.field(default_factory=set)
    load_seconds: float = 0.0
    saved_file: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        return {"key": self.key, "folder": str(self.folder), "loaded": self.loaded_files,
                "loaded_artifacts": len(self.loaded_artifacts), "load_seconds": round(self.load_seconds, 2),
                "saved": self.saved_file, "notes": self.notes}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_fields(device: str) -> dict:
    """Hardware and software that compiled code depends on."""
    fields = {"format": FORMAT, "python": platform.python_version(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "triton": _version("triton") or _version("pytorch-triton"),
              "diffusers": _version("diffusers"), "transformers": _version("transformers"),
              "torchao": _version("torchao"), "flash_attn_4": _version("flash-attn-4")}
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        fields["gpu"] = torch.cuda.get_device_name(dev)
        fields["capability"] = "%d.%d" % torch.cuda.get_device_capability(dev)
    else:
        fields["gpu"] = "cpu"
        fields["capability"] = platform.machine()
    return fields


def key_fields(*, device: str, model: str, dtype: str, fp8: bool, attention: str, compile: bool,
               memory_profile: str, switches: dict | None = None, env: dict | None = None) -> dict:
    """All the fields the key hashes. `env` defaults to this machine's environment_fields(device)."""
    fields = dict(env if env is not None else environment_fields(device))
    fields.update({"model": str(model), "dtype": str(dtype).replace("torch.", ""), "fp8": bool(fp8),
                   "attention": attention, "compile": bool(compile), "memory_profile": memory_profile,
                   "switches": dict(sorted((switches or {}).items()))})
    return fields


def derive_key(fields: dict) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


def folder_for(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "compiled" / key


def _artifact_keys(info) -> set:
    artifacts = getattr(info, "artifacts", None) or {}
    return {(kind, key) for kind, keys in artifacts.items() for key in keys}


def _discard(path: Path, reason: str, state: CacheState) -> None:
    log.warning("compile cache: ignoring %s (%s); it is deleted and the process compiles instead", path.name, reason)
    state.notes.append(f"ignored {path.name}: {reason}")
    for p in (path, path.with_suffix(".json")):
        try:
            p.unlink()
        except OSError:
            pass


def prepare(cache_dir: Path, fields: dict, load=None, precompile: bool = False) -> CacheState:
    """Before compiling: find this key's folder and load every valid blob in it. `load` is
    torch.compiler.load_cache_artifacts unless a test passes another. `precompile`: Dynamo's precompile cache
    on, in this key's folder (see use_precompile)."""
    key = derive_key(fields)
    state = CacheState(key=key, fields=fields, folder=folder_for(cache_dir, key))
    if precompile:
        use_precompile(state)
    load = load or torch.compiler.load_cache_artifacts
    t0 = time.perf_counter()
    try:
        stored = json.loads((state.folder / "key.json").read_text()) if (state.folder / "key.json").is_file() else None
        if stored is not None and json.loads(json.dumps(fields, sort_keys=True, default=str)) != stored:
            # Same hash, other fields: never trust it (a hash collision or a hand-edited folder).
            log.warning("compile cache: %s holds artifacts for other settings; ignoring the folder", state.folder)
            state.notes.append("key.json mismatch: folder ignored")
            return state
        for blob in sorted(state.folder.glob("artifacts-*.bin"), key=_blob_index):
            meta_path = blob.with_suffix(".json")
            try:
                meta = json.loads(meta_path.read_text())
                data = blob.read_bytes()
            except (OSError, ValueError) as exc:
                _discard(blob, f"unreadable: {exc!r}"[:200], state)
                continue
            if meta.get("key") != key or meta.get("size") != len(data) or \
                    meta.get("sha256") != hashlib.sha256(data).hexdigest():
                _discard(blob, "checksum or key mismatch (truncated or corrupt)", state)
                continue
            try:
                info = load(data)
            except Exception as exc:  # noqa: BLE001 - torch refusing a blob must not stop the start
                _discard(blob, f"torch could not load it: {str(exc).splitlines()[0][:200] if str(exc) else repr(exc)}",
                         state)
                continue
            state.loaded_files.append(blob.name)
            state.loaded_artifacts |= _artifact_keys(info) | {tuple(a) for a in meta.get("artifacts", [])}
    except Exception as exc:  # noqa: BLE001
        log.warning("compile cache: could not read %s (%r); compiling from scratch", state.folder, exc)
        state.notes.append(f"read error: {exc!r}"[:200])
    state.load_seconds = time.perf_counter() - t0
    if state.loaded_files:
        log.info("compile cache: loaded %d artifacts from %s in %.1fs", len(state.loaded_artifacts), state.folder,
                 state.load_seconds)
    else:
        log.info("compile cache: nothing stored for key %s yet; compiling", key)
    return state


def use_precompile(state: CacheState) -> bool:
    """Turn on Dynamo's precompile cache (`torch._dynamo.config.caching_precompile`) with its packages in
    `<key folder>/dynamo`: a restart then loads the traced graphs and guards of every compiled region instead
    of tracing the Python code again, and another key (settings, versions, GPU) never sees them. torch saves the
    packages inside save_cache_artifacts (store(), after warm-up) and loads one when a compiled function first
    runs; a package it cannot load is logged by torch and that function is traced as usual. Process-wide state:
    the last engine to prepare decides the folder. Needs torch >= PRECOMPILE_TORCH: torch 2.11 saved packages it
    then could not load (`DefaultsSource.__init__() takes from 3 to 4 positional arguments`, a TypeError that
    failed the restart; H100, 2026-11-24); 2.13 restarts from them (tests/test_compile_cache.py)."""
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) < PRECOMPILE_TORCH:
        state.notes.append(f"precompile off: torch {torch.__version__} < {PRECOMPILE_TORCH}")
        return False
    try:
        from torch._dynamo import package

        folder = str(state.folder / "dynamo")
        package.DynamoCache.path_prefix = lambda: folder  # torch's default: <inductor cache>/dynamo, shared by all keys
        torch._dynamo.config.caching_precompile = True
    except Exception as exc:  # noqa: BLE001 - a torch without it traces as before
        log.warning("compile cache: Dynamo's precompile cache is unavailable (%r)", exc)
        state.notes.append(f"precompile unavailable: {exc!r}"[:200])
        return False
    state.notes.append("precompile")
    return True


def forget_precompiled(state: CacheState) -> bool:
    """Delete this key's Dynamo packages (after a failed start with them: the next start traces as usual).
    True if there were any."""
    import shutil

    folder = state.folder / "dynamo"
    if "precompile" not in state.notes or not folder.exists():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    log.warning("compile cache: start-up failed with Dynamo's precompile cache on; its packages in %s are deleted "
                "so the next start traces instead", folder)
    state.notes.append("precompiled packages deleted after a failed start")
    return True


def _blob_index(path: Path) -> int:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def store(state: CacheState | None, save=None) -> str | None:
    """After warm-up: save this process's compiled artifacts if it made any that were not loaded.
    Returns the file written, or None. `save` is torch.compiler.save_cache_artifacts unless a test passes one."""
    if state is None:
        return None
    save = save or torch.compiler.save_cache_artifacts
    try:
        result = save()
        if not result:
            return None
        data, info = result
        keys = _artifact_keys(info)
        if not data or (keys and keys <= state.loaded_artifacts) or (not keys and state.loaded_files):
            return None  # nothing new since the load
        state.folder.mkdir(parents=True, exist_ok=True)
        key_file = state.folder / "key.json"
        if not key_file.is_file():
            _atomic_write(key_file, json.dumps(state.fields, sort_keys=True, indent=1, default=str).encode())
        index = max((_blob_index(p) for p in state.folder.glob("artifacts-*.bin")), default=-1) + 1
        blob = state.folder / f"artifacts-{index}.bin"
        meta = {"key": state.key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "artifacts": sorted([list(k) for k in keys]), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "pid": os.getpid()}
        _atomic_write(blob, data)
        _atomic_write(blob.with_suffix(".json"), json.dumps(meta).encode())  # written last: marks the blob done
        state.saved_file = blob.name
        state.loaded_artifacts |= keys
        log.info("compile cache: saved %d artifacts (%.1f MB) to %s", len(keys), len(data) / 1e6, blob)
        return blob.name
    except Exception as exc:  # noqa: BLE001 - a full disk must not fail the start
        log.warning("compile cache: could not save artifacts (%r)", exc)
        state.notes.append(f"save error: {exc!r}"[:200])
        return None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def engine_fields(engine) -> dict:
    """The key fields for an Engine after its placement and attention backend are chosen."""
    from . import speed

    return key_fields(device=engine.device, model=engine.settings.model, dtype=str(engine.dtype), fp8=engine.fp8,
                      attention=engine.attention_backend, compile=engine.settings.compile_enabled(),
                      memory_profile=engine.placement.profile.name if engine.placement else "none",
                      switches=dataclasses.asdict(speed.switches()))
