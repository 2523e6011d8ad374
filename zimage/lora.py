"""LoRA adapters for the transformer: a folder of `*.safetensors` files, applied per request without recompiling.

    LoraLibrary  the folder (`--lora-dir`). Scanned on every look-up, so new files appear without a restart;
                 a LoRA is named by its file's stem and looked up only among the folder's own files (never a
                 path). Each file is inspected once per (size, mtime) from its header alone, through diffusers'
                 key conversion (`ZImageLoraLoaderMixin.lora_state_dict`: diffusers/peft, kohya and musubi
                 `lora_unet_*`, ComfyUI/ai-toolkit `diffusion_model.*`), so a broken or foreign file is reported
                 with a reason and never breaks the listing or other requests.
    LoraLinear   every nn.Linear of the transformer, wrapped: `base(x) + (x @ down.T) @ up.T`, where `down`
                 (R, in) and `up` (out, R) are buffers preallocated once ("slots") of a fixed total rank R
                 (`--lora-rank`). The base layer is untouched: bf16, or fp8 (fp8.Fp8Linear) with the LoRA branch a
                 separate bf16 matmul added to its output -- nothing is ever merged into fp8 weights.
    LoraRuntime  owned by the engine, used under its GPU lock: applies a job's LoRAs (each adapter's ranks
                 side by side in the slots, its scale folded into `up`, the unused rest zero) and keeps recently
                 used adapters on the device (LRU, bounded in bytes: `--lora-cache-mib`, less where the memory
                 profile has no room).

Why switching never recompiles: the compiled blocks read the slots as buffers of fixed shape and dtype, so a
new LoRA is new data, not new code. The one Python-level switch, `LoraLinear.active` (the same for every
wrapper), gives exactly two graphs per compiled block: without LoRAs (the same ops as an unwrapped model, so
requests without LoRAs pay nothing) and with them; warm-up compiles both when the folder holds LoRAs. This is
the idea of diffusers' `enable_lora_hotswap(target_rank=...)` for peft (pad every adapter to one rank, scales
as tensors), extended to several LoRAs at once and to the project's fp8 layers (peft's hotswap keeps one
adapter per slot, and knows nothing of fp8.Fp8Linear).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .request import LoraSpec, RequestError, lora_name_problem

log = logging.getLogger("zimage.lora")

SUFFIX = ".safetensors"
MAX_FILE_BYTES = 4 << 30  # a rank-128 LoRA over every layer of the 6 B transformer is ~1.3 GB in fp32
# Extra activation memory while the LoRA branch runs (the widest branch output, transient): counted with the
# slots when choosing a memory profile (an estimate from the Turbo shapes at Ultra; measured in PERFORMANCE.md).
ACTIVATION_MARGIN_GIB = 0.25
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class LoraError(Exception):
    """A LoRA file cannot be used; the message says why (shown in the listing and to the requester)."""


@dataclass(frozen=True)
class LoraInfo:
    """What the listing shows for one file of the folder."""

    name: str
    file: str
    size_bytes: int
    ok: bool
    error: str | None = None
    rank: int | None = None  # the largest rank of any of its layers
    modules: int = 0  # layers it changes
    targets: tuple[str, ...] = ()  # kinds of layers, e.g. "attention.to_q", "feed_forward.w1"
    layout: str | None = None  # diffusers | kohya | comfyui
    sha256: str | None = None  # of the file, once it has been loaded
    short_hash: str | None = None  # A1111's "Lora hashes" value: sha256 of the tensor data, 12 hex digits

    def as_dict(self, loaded: bool = False) -> dict:
        return {"name": self.name, "file": self.file, "size_bytes": self.size_bytes, "ok": self.ok,
                "error": self.error, "rank": self.rank, "modules": self.modules, "targets": list(self.targets),
                "layout": self.layout, "loaded": loaded, "hash": self.short_hash, "sha256": self.sha256}


@dataclass
class Adapter:
    """One LoRA, converted to this model's layers: module name -> (down (r, in), up (out, r)), alpha folded in."""

    name: str
    signature: tuple[int, int]  # (size, mtime_ns) of the file it came from
    sha256: str
    short_hash: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    layout: str

    @property
    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() + u.numel() * u.element_size() for d, u in self.weights.values())

    def to(self, device, dtype) -> "Adapter":
        weights = {m: (d.to(device=device, dtype=dtype), u.to(device=device, dtype=dtype))
                   for m, (d, u) in self.weights.items()}
        return replace(self, weights=weights)


# ---- reading and converting files ------------------------------------------------------------------------------
def short_hash(data: bytes) -> str:
    """A1111's LoRA hash ("addnet" hash): sha256 of a safetensors file's tensor data (after its header), 12 hex
    digits. civitai resolves LoRAs by it."""
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest()[:12]


def _fused_qkv(keys) -> bool:
    return any("attention_qkv." in k or "attention.qkv." in k for k in keys)


def _layout(keys) -> str:
    if any(k.startswith("diffusion_model.") for k in keys) or _fused_qkv(keys):
        return "comfyui"  # ComfyUI/ai-toolkit prefix, or ComfyUI's own module names (musubi's converter)
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    return "diffusers"


def _drop_zero_ranks(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Without the ranks whose column of `up` is exactly zero (they add exactly nothing). diffusers splits a
    fused qkv LoRA into q, k and v each with all 3r ranks of `down` and its rows of a block-diagonal `up`; this
    gives each back its own r ranks, bit for bit what a file with separate q, k, v holds."""
    if up.device.type == "meta":
        return down, up
    keep = up.abs().amax(dim=0) != 0
    if bool(keep.all()) or not bool(keep.any()):
        return down, up
    return down[keep], up[:, keep]


def _peft_scale(metadata: dict | None, module: str, rank: int) -> float:
    """alpha / r as peft computes it from diffusers' saved adapter config (r, lora_alpha, rank_pattern,
    alpha_pattern, use_rslora); 1.0 without a config (diffusers then loads with lora_alpha = r)."""
    if not metadata:
        return 1.0
    meta = {k.removeprefix("transformer."): v for k, v in metadata.items()}

    def pattern(table, default):
        for key, value in (table or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    r = pattern(meta.get("rank_pattern"), meta.get("r", rank))
    alpha = pattern(meta.get("alpha_pattern"), meta.get("lora_alpha", r))
    return float(alpha) / (math.sqrt(r) if meta.get("use_rslora") else float(r))


def _split_scale(scale: float) -> tuple[float, float]:
    """How diffusers' Z-Image conversion splits alpha/r between down and up (so every layout folds the same)."""
    down, up = scale, 1.0
    while down * 2 < up:
        down, up = down * 2, up / 2
    return down, up


def _split_fused_qkv(module: str, down: torch.Tensor, up: torch.Tensor) -> dict:
    """`attention.qkv` (musubi's ComfyUI layout: down (3r, in), up (3*out, 3r) block-diagonal), which diffusers
    0.42.1 splits only in its dot-separated layout, into to_q/to_k/to_v. A block-diagonal `up` gives each
    projection its own rank-r pair, bit for bit what the split file holds; any other `up` gives each projection
    the full 3r-rank down with its rows of `up` (the same delta, exactly)."""
    block = module[: -len(".qkv")]
    out3, r3 = up.shape
    if out3 % 3 or r3 % 3 or down.shape[0] != r3:
        raise LoraError(f"{module}: a fused qkv LoRA needs down (3r, in) and up (3*out, 3r); got "
                        f"{tuple(down.shape)} and {tuple(up.shape)}")
    out, r = out3 // 3, r3 // 3
    diagonal = up.device.type == "meta" or all(
        not torch.count_nonzero(up[i * out:(i + 1) * out, j * r:(j + 1) * r])
        for i in range(3) for j in range(3) if i != j)
    parts = {}
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        rows = up[i * out:(i + 1) * out]
        parts[f"{block}.{proj}"] = ((down[i * r:(i + 1) * r], rows[:, i * r:(i + 1) * r]) if diagonal
                                    else (down, rows))
    return parts


def convert(state_dict: dict, metadata: dict | None, targets: dict[str, tuple[int, int]] | None,
            rank_limit: int | None = None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    """A LoRA file's tensors -> {module: (down, up)} for this model, through diffusers' Z-Image conversion.
    `targets`: module -> (in, out) of the loaded transformer (None: names and shapes are not checked).
    Raises LoraError naming what is wrong."""
    keys = list(state_dict)
    if not keys:
        raise LoraError("the file holds no tensors")
    if any(".lokr_" in k or ".hada_" in k for k in keys):
        raise LoraError("LoKr/LoHa adapters are not supported here; only LoRA (lora_A/lora_B or lora_down/lora_up)")
    if not any("lora" in k for k in keys):
        raise LoraError(f"not a LoRA: it holds no lora_A/lora_B or lora_down/lora_up weights (keys like "
                        f"{keys[0][:80]!r}); is it a full model checkpoint?")
    layout = _layout(keys)
    fused = _fused_qkv(keys)
    alphas_present = any(k.endswith(".alpha") for k in keys)
    from diffusers import ZImagePipeline  # ZImageLoraLoaderMixin.lora_state_dict: every layout diffusers reads

    try:
        converted = ZImagePipeline.lora_state_dict(dict(state_dict))
    except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError, KeyError, IndexError ... on foreign keys
        raise LoraError(f"its keys are not a Z-Image LoRA layout diffusers can convert "
                        f"({type(exc).__name__}: {str(exc)[:160]})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    unsupported = []
    for key, tensor in converted.items():
        match = _LORA_KEY.match(key.removeprefix("transformer."))
        if match is None:
            unsupported.append(key)
            continue
        pairs[match["module"]][match["which"]] = tensor
    if unsupported:
        bias = [k for k in unsupported if k.endswith("lora_B.bias")]
        what = "LoRA bias terms (lora_B.bias)" if bias else f"keys this server cannot apply ({unsupported[0][:80]!r})"
        raise LoraError(f"it has {len(unsupported)} {what}; only plain LoRA weights are supported")
    weights = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise LoraError(f"layer {module} has lora_{'A' if 'A' in pair else 'B'} without its other half")
        down, up = pair["A"], pair["B"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise LoraError(f"layer {module}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a LoRA pair")
        if layout == "diffusers" and not alphas_present:
            scale = _peft_scale(metadata, module, down.shape[0])
            if scale != 1.0:
                s_down, s_up = _split_scale(scale)
                down, up = down * s_down, up * s_up
        if module.endswith(".attention.qkv"):
            weights.update(_split_fused_qkv(module, down, up))
        elif fused and re.search(r"\.attention\.to_[qkv]$", module):
            weights[module] = _drop_zero_ranks(down, up)
        else:
            weights[module] = (down, up)
    if targets is not None:
        foreign = sorted(m for m in weights if m not in targets)
        if foreign:
            known = len(weights) - len(foreign)
            raise LoraError(f"not a LoRA for this model: {len(foreign)} of its {len(weights)} layers do not exist "
                            f"here (e.g. {foreign[0]!r}){'' if known else '; it is probably for another model'}")
        for module, (down, up) in weights.items():
            n_in, n_out = targets[module]
            if down.shape[1] != n_in or up.shape[0] != n_out:
                raise LoraError(f"layer {module} is {n_in}->{n_out} here but the LoRA's is {down.shape[1]}->"
                                f"{up.shape[0]}: a LoRA for another model size?")
    rank = max(d.shape[0] for d, _ in weights.values())
    if rank_limit is not None and rank > rank_limit:
        raise LoraError(f"its rank is {rank}; this server's LoRA rank budget is {rank_limit} (--lora-rank)")
    return weights, layout


def _targets_summary(weights) -> tuple[str, ...]:
    return tuple(sorted({re.sub(r"^(layers|noise_refiner|context_refiner)\.\d+\.", "", m) for m in weights}))


class LoraLibrary:
    """The LoRA folder. Thread-safe; every look-up rescans the folder (a directory listing and stats)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.targets: dict[str, tuple[int, int]] | None = None  # set when the model is loaded
        self.rank_limit: int | None = None
        self._infos: dict[str, tuple[tuple, LoraInfo]] = {}
        self._lock = threading.Lock()

    def attach(self, targets: dict[str, tuple[int, int]], rank_limit: int | None) -> None:
        with self._lock:
            self.targets, self.rank_limit = targets, rank_limit
            self._infos.clear()  # inspected without the model's layers: inspect again

    def scan(self) -> dict[str, tuple[Path, tuple[int, int]]]:
        """name -> (path, (size, mtime_ns)) for every `*.safetensors` file directly in the folder."""
        found = {}
        try:
            entries = list(os.scandir(self.folder))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as exc:
            log.warning("cannot read the LoRA folder %s: %s", self.folder, exc)
            return {}
        for entry in entries:
            if not entry.name.lower().endswith(SUFFIX) or entry.name.startswith("."):
                continue
            try:
                if not entry.is_file():
                    continue
                st = entry.stat()
            except OSError:
                continue
            found[entry.name[: -len(SUFFIX)]] = (Path(entry.path), (st.st_size, st.st_mtime_ns))
        return found

    def names(self) -> list[str]:
        return sorted(self.scan(), key=str.lower)

    def listing(self) -> list[LoraInfo]:
        files = self.scan()
        return [self._info(name, *files[name]) for name in sorted(files, key=str.lower)]

    def info(self, name: str) -> LoraInfo | None:
        """The file's info, or None if the folder has no such LoRA."""
        found = self.scan().get(name)
        return None if found is None else self._info(name, *found)

    def _info(self, name: str, path: Path, signature: tuple[int, int]) -> LoraInfo:
        with self._lock:
            cached = self._infos.get(name)
            if cached and cached[0] == signature:
                return cached[1]
            targets, rank_limit = self.targets, self.rank_limit
        info = self._inspect(name, path, signature, targets, rank_limit)
        with self._lock:
            self._infos[name] = (signature, info)
        return info

    def _inspect(self, name, path, signature, targets, rank_limit) -> LoraInfo:
        size = signature[0]
        problem = lora_name_problem(name)
        if problem:
            return LoraInfo(name, path.name, size, False, f"the file name cannot be used as a LoRA name: {problem}")
        try:
            if size > MAX_FILE_BYTES:
                raise LoraError(f"the file is {size / 2**30:.1f} GiB; LoRA files are limited to "
                                f"{MAX_FILE_BYTES >> 30} GiB")
            tensors, metadata = _read_header(path)
            if _fused_qkv(tensors):  # the ranks of its q, k, v depend on which of its values are zero
                tensors, metadata = _read_all(path)
            weights, layout = convert(tensors, metadata, targets, rank_limit)
        except LoraError as exc:
            return LoraInfo(name, path.name, size, False, str(exc))
        except Exception as exc:  # noqa: BLE001 - a hostile or truncated file must never break the listing
            log.warning("LoRA %s: inspection failed: %r", name, exc)
            return LoraInfo(name, path.name, size, False, f"could not be read ({type(exc).__name__}: {str(exc)[:160]})")
        return LoraInfo(name, path.name, size, True, rank=max(d.shape[0] for d, _ in weights.values()),
                        modules=len(weights), targets=_targets_summary(weights), layout=layout)

    def load(self, name: str) -> Adapter:
        """The file's tensors, converted and checked (CPU). LoraError if it is missing or unusable."""
        found = self.scan().get(name)
        if found is None:
            raise LoraError(f"LoRA {name!r} is no longer in the LoRA folder")
        path, signature = found
        if signature[0] > MAX_FILE_BYTES:
            raise LoraError(f"LoRA {name!r}: the file is larger than {MAX_FILE_BYTES >> 30} GiB")
        data = path.read_bytes()
        import safetensors
        import safetensors.torch

        try:
            tensors = safetensors.torch.load(data)
            header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
        except (safetensors.SafetensorError, ValueError, UnicodeDecodeError) as exc:
            raise LoraError(f"LoRA {name!r} could not be read as safetensors ({str(exc)[:160]})") from None
        metadata = _adapter_metadata(header.get("__metadata__"))
        try:
            weights, layout = convert(tensors, metadata, self.targets, self.rank_limit)
        except LoraError as exc:
            raise LoraError(f"LoRA {name!r} cannot be used: {exc}") from None
        adapter = Adapter(name, signature, hashlib.sha256(data).hexdigest(), short_hash(data),
                          max(d.shape[0] for d, _ in weights.values()),
                          {m: (d.contiguous(), u.contiguous()) for m, (d, u) in weights.items()}, layout)
        with self._lock:  # the listing now knows its hashes
            cached = self._infos.get(name)
            if cached and cached[0] == signature:
                self._infos[name] = (signature, replace(cached[1], sha256=adapter.sha256,
                                                        short_hash=adapter.short_hash))
        return adapter


def _adapter_metadata(file_metadata: dict | None) -> dict | None:
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    raw = (file_metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise LoraError("its adapter metadata (lora_adapter_metadata) is not valid JSON") from None
    return value if isinstance(value, dict) else None


def _read_all(path: Path) -> tuple[dict, dict | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, _adapter_metadata(f.metadata())
    except SafetensorError as exc:
        raise LoraError(f"not a readable safetensors file ({str(exc)[:160]})") from None


def _read_header(path: Path) -> tuple[dict, dict | None]:
    """The file's tensors as meta tensors (shapes and dtypes only; `.alpha` scalars read for real, since the
    conversion folds them in) and its LoRA metadata. Reads the header, not the weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {}
            for key in f.keys():
                if key.endswith(".alpha"):
                    tensors[key] = f.get_tensor(key)
                    continue
                piece = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise LoraError(f"tensor {key[:80]!r} has dtype {piece.get_dtype()}, not a float type")
                tensors[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    except SafetensorError as exc:
        raise LoraError(f"not a readable safetensors file ({str(exc)[:160]})") from None
    return tensors, _adapter_metadata(metadata)


# ---- the branch on every Linear, and applying a request's set ---------------------------------------------------
class LoraLinear(torch.nn.Module):
    """A Linear (nn.Linear or fp8.Fp8Linear) plus a LoRA branch of fixed rank whose weights are buffers ("slots")
    rewritten per request. `weight`/`bias` are the base layer's (diffusers reads `mlp[0].weight.dtype`)."""

    def __init__(self, base: torch.nn.Module, rank: int, device, dtype):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.active = False  # Python-level: Dynamo compiles one graph with the branch and one without
        self.used = 0  # leading slot columns holding something (the rest are zero)
        self.register_buffer("lora_down", torch.zeros(rank, base.in_features, device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("lora_up", torch.zeros(base.out_features, rank, device=device, dtype=dtype),
                             persistent=False)

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.active:
            out = out + self.branch(x).to(out.dtype)
        return out

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """What the LoRAs add to this layer's output (also used by fusion.FusedLinear for a fused layer)."""
        return F.linear(F.linear(x.to(self.lora_down.dtype), self.lora_down), self.lora_up)

    def extra_repr(self) -> str:
        return f"rank={self.lora_down.shape[0]}, active={self.active}"


def install(transformer: torch.nn.Module, rank: int, device, dtype) -> dict[str, LoraLinear]:
    """Wrap every Linear of `transformer` (nn.Linear or fp8.Fp8Linear; names as diffusers' LoRA keys use them)
    in a LoraLinear."""
    wrappers = {}
    for name, module in list(transformer.named_modules()):
        if _linears(module):
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            wrapper = LoraLinear(module, rank, device, dtype)
            setattr(parent, child, wrapper)
            wrappers[name] = wrapper
    return wrappers


def slot_bytes(shapes, rank: int, bytes_per_value: int) -> int:
    """Slot memory for layers of (in, out) shapes at a total rank."""
    return sum(rank * (n_in + n_out) for n_in, n_out in shapes) * bytes_per_value


def turbo_linear_shapes() -> list[tuple[int, int]]:
    """(in, out) of every Linear of the full-size Z-Image-Turbo transformer (for memory planning before loading)."""
    from .loading import TURBO_TRANSFORMER

    dim, hidden, adaln = TURBO_TRANSFORMER["dim"], int(TURBO_TRANSFORMER["dim"] / 3 * 8), 256
    attn_ffn = [(dim, dim)] * 4 + [(dim, hidden), (hidden, dim), (dim, hidden)]
    main = TURBO_TRANSFORMER["n_layers"] + TURBO_TRANSFORMER["n_refiner_layers"]  # with adaLN
    shapes = (attn_ffn + [(adaln, 4 * dim)]) * main + attn_ffn * TURBO_TRANSFORMER["n_refiner_layers"]
    shapes += [(64, dim), (TURBO_TRANSFORMER["cap_feat_dim"], dim), (256, 1024), (1024, adaln), (dim, 64),
               (adaln, dim)]
    return shapes


def reserve_gib(rank: int, mode: str = "branch", fp8: bool = False) -> float:
    """GPU memory LoRAs need beyond the full-size model, for choosing a memory profile: the slots plus the branch's
    activations (branch), or the copy of every Linear weight (merge; fp8: 1 byte a weight)."""
    if mode == "merge":
        return sum(n_in * n_out for n_in, n_out in turbo_linear_shapes()) * (1 if fp8 else 2) / 2**30
    if rank <= 0:
        return 0.0
    return slot_bytes(turbo_linear_shapes(), rank, 2) / 2**30 + ACTIVATION_MARGIN_GIB


@dataclass
class LoraStats:
    loads: int = 0  # adapters read from disk
    cache_hits: int = 0
    switches: int = 0  # applies that rewrote the slots
    last_switch_seconds: float = 0.0
    last_load_seconds: float = 0.0


MODES = ("branch", "merge")


def _linears(module: torch.nn.Module) -> bool:
    from .fp8 import Fp8Linear

    return isinstance(module, (torch.nn.Linear, Fp8Linear))


def _snapshot(base):
    """A copy of a layer's weight to restore it from: the tensor, or an fp8 layer's e4m3 rows and their scales."""
    from .fp8 import Fp8Linear

    if isinstance(base, Fp8Linear):
        return {"weight": base.weight.detach().clone(), "weight_scale": base.weight_scale.detach().clone()}
    return base.weight.detach().clone()


def _nbytes(snapshot) -> int:
    tensors = snapshot.values() if isinstance(snapshot, dict) else [snapshot]
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(transformer: torch.nn.Module) -> int:
    """Bytes of every Linear weight of `transformer` (what merge mode keeps a second copy of)."""
    total = 0
    for module in transformer.modules():
        if _linears(module):
            total += module.weight.numel() * module.weight.element_size()
            scale = getattr(module, "weight_scale", None)
            total += 0 if scale is None else scale.numel() * scale.element_size()
    return total


class LoraRuntime:
    """The engine's LoRA state: slots on every Linear, the device cache, what the slots hold now.

    mode "branch": the LoRA branch beside every layer, as described above (`--lora-mode auto` picks it where
    merge mode's copy does not fit: the 16gb/12gb profiles, smaller cards, the CPU).
    mode "merge": a request's LoRAs are added into the layers' weights (W = W0 + sum of scale * up @ down, from a
    copy W0 kept on the device; fp8 weights are dequantized, merged and quantized again in place) and taken out
    again by restoring W0: no per-step cost, a switch rewrites the weights the LoRAs touch. The copy W0 of a layer
    is taken when a LoRA is first merged into it and dropped when the layer gets W0 back, so without LoRAs it
    costs nothing (the memory plan still counts the whole copy). The compiled code is the no-LoRA code throughout.
    An fp8 layer (fp8.Fp8Linear) is dequantized from its saved e4m3 rows, merged in float32 and quantized again
    into the same tensors; without LoRAs its saved rows and scales come back exactly."""

    def __init__(self, library: LoraLibrary, transformer: torch.nn.Module, device: str, dtype: torch.dtype,
                 rank: int, cache_bytes: int, mode: str = "branch"):
        if mode not in MODES:
            raise ValueError(f"unknown LoRA mode {mode!r}")
        self.library, self.device, self.dtype, self.mode = library, device, dtype, mode
        self.transformer = transformer
        self.rank = rank if mode == "branch" else None  # merge: no slots, any rank
        self.cache_bytes = cache_bytes
        self.wrappers = install(transformer, rank if mode == "branch" else 0, device, dtype)
        self.targets = {name: (w.in_features, w.out_features) for name, w in self.wrappers.items()}
        library.attach(self.targets, self.rank)
        self.slot_bytes = (slot_bytes(self.targets.values(), rank, torch.empty((), dtype=dtype).element_size())
                           if mode == "branch" else 0)
        self.masters: dict = {}  # merge: W0 of the layers that hold a LoRA now (taken at their first merge)
        self.master_bytes = weight_bytes(transformer) if mode == "merge" else 0  # the most the copies can take
        self.cache: collections.OrderedDict[str, Adapter] = collections.OrderedDict()
        self._cache_lock = threading.Lock()  # the GPU thread changes the cache; listings read it from others
        self.stats = LoraStats()
        self._applied: tuple | None = ()  # key of the slots' contents; () = inactive, None = unknown
        self._records: list[dict] = []
        self._warming = False
        if mode == "branch":
            log.info("LoRA slots: rank %d on %d layers (%.0f MiB), device cache up to %.0f MiB, folder %s", rank,
                     len(self.wrappers), self.slot_bytes / 2**20, cache_bytes / 2**20, library.folder)
        else:
            log.info("LoRA merge mode: %d layers, weight copy %.0f MiB, device cache up to %.0f MiB, folder %s",
                     len(self.wrappers), self.master_bytes / 2**20, cache_bytes / 2**20, library.folder)

    def resident_bytes(self) -> int:
        """Device memory LoRAs hold beside the model (the cache aside): the slots plus the branch's activations
        (ACTIVATION_MARGIN_GIB on the full-size model, in proportion on smaller ones), or merge mode's copy."""
        if self.mode == "merge":
            return self.master_bytes
        if not self.rank:
            return 0
        full = slot_bytes(turbo_linear_shapes(), self.rank, torch.empty((), dtype=self.dtype).element_size())
        return int(self.slot_bytes + ACTIVATION_MARGIN_GIB * 2**30 * min(1.0, self.slot_bytes / full))

    # ---- resolve time: cheap checks, any thread -----------------------------------------------------------------
    def check(self, specs: tuple[LoraSpec, ...]) -> None:
        """RequestError unless every LoRA is a usable file of the folder and their ranks fit the slots together."""
        total = 0
        for spec in specs:
            param = "prompt" if spec.source == "prompt" else "loras"
            info = self.library.info(spec.name)
            if info is None:
                names = self.library.names()
                have = (f"it has {', '.join(repr(n) for n in names[:12])}{', ...' if len(names) > 12 else ''}"
                        if names else "it is empty")
                raise RequestError(f"unknown LoRA {spec.name!r}: no {spec.name}{SUFFIX} in the LoRA folder ({have})",
                                   param)
            if not info.ok:
                raise RequestError(f"LoRA {spec.name!r} cannot be used: {info.error}", param)
            total += info.rank if spec.scale != 0 else 0
        if self.rank is not None and total > self.rank:
            raise RequestError(f"these LoRAs have rank {total} together; this server applies up to rank {self.rank} "
                               "at once (--lora-rank): use fewer or lower-rank LoRAs", "loras")

    def loaded_names(self) -> set[str]:
        with self._cache_lock:
            return set(self.cache) | {r["name"] for r in self._records}

    # ---- under the engine's GPU lock ----------------------------------------------------------------------------
    def warming(self):
        """While warming up: a job without LoRAs runs the LoRA branch with zero weights (compiles that graph)."""
        runtime = self

        class _Warming:
            def __enter__(self):
                runtime._warming = True

            def __exit__(self, *exc):
                runtime._warming = False

        return _Warming()

    @torch.no_grad()
    def apply(self, specs: tuple[LoraSpec, ...]) -> list[dict]:
        """Make the slots hold exactly `specs` (each adapter's ranks side by side, its scale folded into `up`,
        the rest zero). A no-op when they already do. Returns what was applied, for results and metadata.
        Raises LoraError (the file vanished or changed into something unusable)."""
        if not specs and self._warming and self.mode == "branch":
            if self._applied != "zero":
                self._write([])
                self._applied, self._records = "zero", []
            return []
        adapters = [self._adapter(spec.name) for spec in specs]
        key = tuple((a.name, a.sha256, spec.scale) for a, spec in zip(adapters, specs))
        if key == self._applied:
            return [dict(r) for r in self._records]
        started = time.perf_counter()
        self._applied = None  # unknown until written: a failure below rewrites everything next time
        # A LoRA at scale 0 adds exactly nothing: it takes no slot, and a set of only those runs without the branch.
        pairs = [(a, spec.scale) for a, spec in zip(adapters, specs) if spec.scale != 0]
        if self.mode == "merge":
            self._merge(pairs)
        else:
            self._write(pairs or None)
        self._applied = key
        self._records = [{"name": a.name, "scale": spec.scale, "hash": a.short_hash, "sha256": a.sha256}
                         for a, spec in zip(adapters, specs)]
        self._evict(keep=())
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        self.stats.switches += 1
        self.stats.last_switch_seconds = time.perf_counter() - started
        return [dict(r) for r in self._records]

    def _branch_active(self) -> bool:
        return next(iter(self.wrappers.values())).active

    def _write(self, pairs: list[tuple[Adapter, float]] | None) -> None:
        """pairs None: branch off everywhere. A list (maybe empty): branch on, slots = the list."""
        graphed = (getattr(self.transformer, "layers", None), self.transformer.__dict__.get("forward"))
        for holder in graphed:  # CUDA graphs of the blocks or the whole transformer: one per branch state
            if hasattr(holder, "key_parts") and self._branch_active not in holder.key_parts:
                holder.key_parts.append(self._branch_active)
        if pairs is None:
            for w in self.wrappers.values():
                w.active = False
            return
        total = sum(a.rank for a, _ in pairs)
        if total > self.rank:
            raise LoraError(f"these LoRAs have rank {total} together; the slots hold {self.rank}")
        for name, w in self.wrappers.items():
            offset = 0
            for adapter, scale in pairs:
                pair = adapter.weights.get(name)
                if pair is None:
                    continue
                down, up = pair
                r = down.shape[0]
                w.lora_down[offset:offset + r].copy_(down)
                torch.mul(up, scale, out=w.lora_up[:, offset:offset + r])
                offset += r
            if w.used > offset:
                w.lora_down[offset:w.used].zero_()
                w.lora_up[:, offset:w.used].zero_()
            w.used = offset
            w.active = True

    def _merge(self, pairs: list[tuple[Adapter, float]]) -> None:
        """Merge mode: every layer a LoRA of `pairs` touches gets W0 + sum(scale * up @ down); every other layer
        that held a LoRA gets W0 back (bit for bit)."""
        wanted = {}
        for name in self.wrappers:
            found = [(adapter.weights[name], scale) for adapter, scale in pairs if name in adapter.weights]
            if found:
                wanted[name] = (torch.cat([up * scale for (_, up), scale in found], dim=1),
                                torch.cat([down for (down, _), _ in found], dim=0))
        # A layer holds a LoRA exactly while its W0 is kept (also after a failure half-way: the next apply
        # restores what it no longer wants).
        for name in set(self.masters) - set(wanted):
            self._restore(name)
        for name, (up, down) in wanted.items():
            base = self.wrappers[name].base
            master = self.masters.get(name)
            if master is None:  # the layer holds W0 now: keep it to merge from and to restore
                master = self.masters[name] = _snapshot(base)
            if isinstance(master, dict):  # fp8: W0 from its saved e4m3 rows, + delta in float32, quantized again
                from .fp8 import quantize_rows

                value = master["weight"].float() * master["weight_scale"].reshape(-1, 1)
                q, scale = quantize_rows(value.addmm_(up.float(), down.float()))
                base.weight.data.copy_(q)
                base.weight_scale.copy_(scale.reshape(1, -1))
            else:
                torch.addmm(master, up.to(master.dtype), down.to(master.dtype), out=base.weight.data)

    def _restore(self, name: str) -> None:
        base, master = self.wrappers[name].base, self.masters.pop(name)
        if isinstance(master, dict):
            base.weight.data.copy_(master["weight"])
            base.weight_scale.copy_(master["weight_scale"])
        else:
            base.weight.data.copy_(master)

    def _adapter(self, name: str) -> Adapter:
        found = self.library.scan().get(name)
        if found is None:
            raise LoraError(f"LoRA {name!r} is no longer in the LoRA folder")
        cached = self.cache.get(name)
        if cached is not None and cached.signature == found[1]:
            with self._cache_lock:
                self.cache.move_to_end(name)
            self.stats.cache_hits += 1
            return cached
        started = time.perf_counter()
        adapter = self.library.load(name).to(self.device, self.dtype)
        self.stats.loads += 1
        self.stats.last_load_seconds = time.perf_counter() - started
        log.info("LoRA %s loaded: rank %d, %d layers, %.1f MiB, %s layout, %.2fs", name, adapter.rank,
                 len(adapter.weights), adapter.nbytes / 2**20, adapter.layout, self.stats.last_load_seconds)
        with self._cache_lock:
            self.cache[name] = adapter
        return adapter

    def _evict(self, keep: tuple[str, ...]) -> None:
        """Drop least recently used adapters until the cache fits its budget (what is applied stays in the slots)."""
        with self._cache_lock:
            used = sum(a.nbytes for a in self.cache.values())
            for name in list(self.cache):
                if used <= self.cache_bytes:
                    break
                if name in keep:
                    continue
                used -= self.cache.pop(name).nbytes

    def drop_cache(self) -> None:
        """Free the device cache (an out-of-memory retry)."""
        with self._cache_lock:
            self.cache.clear()

    def describe(self) -> dict:
        return {"mode": self.mode, "rank": self.rank, "layers": len(self.wrappers),
                "slot_mib": round(self.slot_bytes / 2**20, 1), "weight_copy_mib": round(self.master_bytes / 2**20, 1),
                "weight_copy_held_mib": round(sum(_nbytes(m) for m in self.masters.values()) / 2**20, 1),
                "cache_mib": round(self.cache_bytes / 2**20, 1), "folder": str(self.library.folder),
                "cached": sorted(self.loaded_names() - {r["name"] for r in self._records}),
                "applied": [r["name"] for r in self._records],
                "loads": self.stats.loads, "switches": self.stats.switches}
