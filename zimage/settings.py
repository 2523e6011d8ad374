"""Every knob of the service, in one object.

Each option is declared once in OPTIONS (name, CLI flag, env var, parser, help); its default is the
Settings field of the same name. `Settings.load` reads the environment (`ZIMAGE_*`), then the command line
(which wins), validates everything, and fails with a message naming the flag, the env var and the allowed
values. Nothing else in the project reads `ZIMAGE_*` variables.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .security import parse_allowed_hosts

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
ON_OFF_AUTO = ("auto", "on", "off")
MEMORY_PROFILES = ("auto", "full", "16gb", "12gb")
DTYPES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32"}
LOG_LEVELS = ("debug", "info", "warning", "error")


class SettingsError(ValueError):
    """A setting has a value the service cannot use; the message says which and what is allowed."""


def _choice(allowed: Sequence[str]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"allowed values: {', '.join(allowed)}")
        return value

    return parse


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ValueError(f"expected an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected an integer from {lo} to {hi}")
        return value

    return parse


def _positive_float(raw: str) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ValueError("expected a positive number") from None
    if not value > 0:
        raise ValueError("expected a positive number")
    return value


def _gib(raw: str) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ValueError("expected a number of GiB (0 for the whole card)") from None
    if value < 0:
        raise ValueError("expected a number of GiB (0 for the whole card)")
    return value


def _dtype(raw: str) -> str:
    value = raw.strip().lower()
    if value not in DTYPES:
        raise ValueError("allowed values: auto, bf16, fp32 (fp16 is refused: the FLUX VAE overflows in fp16)")
    return DTYPES[value]


def _device(raw: str) -> str:
    value = raw.strip().lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError("allowed values: auto, cpu, cuda, cuda:N")


def _attention(raw: str) -> str:
    value = raw.strip()
    if value in ("auto", "fa4"):  # fa4: FlashAttention-4 through the project's processor (zimage/fastattn.py)
        return value
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = [b.value for b in AttentionBackendName]
    if value not in names:
        raise ValueError(f"allowed values: auto, fa4, {', '.join(names)}")
    return value


def _auth(raw: str) -> str:
    value = raw.strip()
    if value and (":" not in value or not value.split(":", 1)[0] or not value.split(":", 1)[1]):
        raise ValueError("expected user:password (both non-empty), or empty for no auth")
    try:
        value.encode("utf-8")  # any Unicode, but text: undecodable bytes in the environment become surrogates
    except UnicodeEncodeError:
        raise ValueError("user:password must be valid UTF-8 text") from None
    return value


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("", "0", "off", "false", "no"):
        return False
    raise ValueError("allowed values: on, off (or 1/0, true/false, yes/no; the bare flag means on)")


def _gpus(raw: str) -> str:
    value = raw.strip().lower()
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise ValueError("expected auto, or a number of GPUs per replica (0 for CPU replicas, 0.5 to share a GPU)") from None
    if not 0 <= number <= 64:
        raise ValueError("expected auto, or a number of GPUs per replica from 0 to 64")
    return f"{number:g}"


def _text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _path(raw: str) -> Path:
    return Path(_text(raw)).expanduser()


@dataclass(frozen=True)
class Option:
    name: str  # a field of Settings, which holds the default
    parse: Callable[[str], Any]
    help: str
    const: str | None = None  # value of the bare flag (no argument), for on/off options

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "ZIMAGE_" + self.name.upper()

    @property
    def default(self) -> Any:
        return _DEFAULTS[self.name]


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zimage"


OPTIONS: tuple[Option, ...] = (
    Option("model", _text,
           "'tiny' (offline demo), 'tiny-random', 'random-full' (full-size random weights, GPU benchmarks), "
           "a Hugging Face id, or a local folder saved by save_pretrained"),
    Option("device", _device, "auto (cuda if available), cpu, cuda, cuda:N"),
    Option("dtype", _dtype, "auto (bf16 on CUDA, fp32 on CPU), bf16, fp32"),
    Option("attention", _attention, "attention backend: auto (fastest available), fa4 (flash-attn-4) or a diffusers backend name"),
    Option("compile", _choice(ON_OFF_AUTO), "regional torch.compile of the transformer: auto (on for CUDA)"),
    Option("fp8", _choice(ON_OFF_AUTO),
           "fp8 rowwise transformer weights (zimage/fp8.py): auto (on where compute capability >= 8.9 and dtype is bf16)"),
    Option("memory_profile", _choice(MEMORY_PROFILES),
           "which parts stay on the GPU: auto (chosen from the card's memory), full, 16gb, 12gb"),
    Option("gpu_memory_limit", _gib,
           "GiB of the GPU this process may use, as if the card were that small (0: the whole card)"),
    Option("outputs", _path, "folder for generated images and their history index"),
    Option("host", _text, "address to bind; 0.0.0.0 to serve other machines"),
    Option("port", _int_range(1, 65535), "port to bind"),
    Option("queue_size", _int_range(1, 10_000), "requests allowed to wait for the GPU; more get 'busy' / HTTP 429"),
    Option("shutdown_grace", _int_range(0, 3600), "seconds a stopping service (SIGTERM: supervisorctl stop/restart) "
           "lets running and queued generations finish before it cancels them with HTTP 503 + Retry-After"),
    Option("auth", _auth, "user:password protecting the UI and the JSON API (empty: no auth)"),
    Option("allowed_hosts", parse_allowed_hosts,
           "extra Host names to answer to, comma-separated (name, name:port, IP); loopback names and a specific "
           "--host are always allowed; '*' disables the check (DNS rebinding becomes possible)"),
    Option("allow_public_no_auth", _flag,
           "serve a non-loopback --host without --auth, on purpose (refused otherwise)", const="on"),
    Option("cache_dir", _path, "where the tiny model and compile caches live (default ~/.cache/zimage)"),
    Option("warmup", _choice(ON_OFF_AUTO), "generate once per served shape before reporting ready"),
    Option("embed_cache", _int_range(0, 4096), "prompt embeddings kept for repeated prompts (0 disables)"),
    Option("oom_fatal_count", _int_range(1, 1000), "this many OOMs within --oom-fatal-window seconds is fatal"),
    Option("oom_fatal_window", _positive_float, "seconds over which --oom-fatal-count OOMs are counted"),
    Option("log_level", _choice(LOG_LEVELS), "log level"),
    # LoRAs (zimage/lora.py): every *.safetensors in the folder is a LoRA named by its file's stem.
    Option("lora_dir", _path, "folder of LoRA files (*.safetensors), rescanned on every request"),
    Option("max_loras", _int_range(0, 8), "LoRAs one request may use (0 turns LoRAs off)"),
    Option("lora_rank", _int_range(0, 1024),
           "total rank of the LoRAs one request applies together, preallocated on every layer (0 turns LoRAs off)"),
    Option("lora_mode", _choice(("auto", "branch", "merge")),
           "how LoRAs are applied: auto (merge where the GPU has room for it beside the full memory profile, else "
           "branch), branch (a LoRA matmul beside every layer: any memory profile, fp8 included) or "
           "merge (added into the weights per request: no per-step cost; needs the transformer resident and room for a "
           "second copy of its weights on the GPU; fp8 weights are quantized again at each switch)"),
    Option("lora_cache_mib", _int_range(0, 1 << 20),
           "MiB of recently used LoRAs kept on the GPU (less where the memory profile has no room)"),
    # Scale-out on Ray Serve (zimage/replicas.py; README "Scale-out"). 0 replicas: the single-process service.
    Option("replicas", _int_range(0, 1024),
           "0: one engine in this process (default); N: N engine replicas on Ray Serve behind this app"),
    Option("ray_address", str.strip,
           "with --replicas: the Ray cluster to join (auto, host:port, ray://...); empty starts a local Ray instance"),
    Option("replica_gpus", _gpus,
           "with --replicas: GPUs per replica: auto (1 where the cluster has GPUs, else 0), or a number"),
    Option("ray_dashboard", _flag,
           "with --replicas and a local Ray instance: start Ray's dashboard on 127.0.0.1:8265", const="on"),
)


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    compile: str = "auto"
    fp8: str = "auto"
    memory_profile: str = "auto"
    gpu_memory_limit: float = 0.0
    outputs: Path = Path("outputs")
    host: str = "127.0.0.1"
    port: int = 7860
    queue_size: int = 32
    shutdown_grace: int = 20  # supervisord's stopwaitsecs (45) covers it plus the answers and the outputs flush
    auth: str = ""
    allowed_hosts: tuple[str, ...] = ()
    allow_public_no_auth: bool = False
    cache_dir: Path | None = None
    warmup: str = "auto"
    embed_cache: int = 64
    oom_fatal_count: int = 3
    oom_fatal_window: float = 60.0
    log_level: str = "info"
    lora_dir: Path = Path("loras")
    max_loras: int = 4
    lora_rank: int = 64
    lora_mode: str = "auto"
    lora_cache_mib: int = 1024
    replicas: int = 0
    ray_address: str = ""
    replica_gpus: str = "auto"
    ray_dashboard: bool = False

    def __post_init__(self) -> None:
        if self.cache_dir is None:
            object.__setattr__(self, "cache_dir", _default_cache_dir())

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> "Settings":
        """Settings from env `ZIMAGE_*` and command-line flags (flags win). Raises SettingsError."""
        return cls.from_args(build_arg_parser().parse_args(argv), env)

    @classmethod
    def from_args(cls, cli: argparse.Namespace, env: Mapping[str, str] | None = None) -> "Settings":
        """Settings from parsed flags (a parser made with add_options) and env `ZIMAGE_*`."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for opt in OPTIONS:
            raw, source = getattr(cli, opt.name), opt.flag
            if raw is None:
                raw, source = env.get(opt.env), opt.env
            if raw is None:
                continue
            try:
                values[opt.name] = opt.parse(str(raw))
            except ValueError as exc:
                raise SettingsError(f"{opt.flag} / {opt.env}: invalid value {str(raw)!r} (from {source}); {exc}") from None
        return cls(**values)

    def replace(self, **changes: Any) -> "Settings":
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return Settings(**{**current, **changes})

    # Resolution of 'auto' values that depend on the machine.
    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_dtype(self):
        import torch

        dtype = self.dtype
        if dtype == "auto":
            dtype = "bf16" if self.torch_device().startswith("cuda") else "fp32"
        return torch.bfloat16 if dtype == "bf16" else torch.float32

    def compile_enabled(self) -> bool:
        return self.compile == "on" or (self.compile == "auto" and self.torch_device().startswith("cuda"))

    def loras_enabled(self) -> bool:
        return self.max_loras > 0 and self.lora_rank > 0

    def warmup_enabled(self) -> bool:
        return self.warmup != "off"

    def auth_pair(self) -> tuple[str, str] | None:
        if not self.auth:
            return None
        user, password = self.auth.split(":", 1)
        return user, password


_DEFAULTS = {f.name: f.default for f in fields(Settings)}


def add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """CLI flags for every option; defaults are None so that 'not given' falls through to env."""
    group = parser.add_argument_group("service settings (each also read from ZIMAGE_<NAME>; flags win)")
    for opt in OPTIONS:
        default = {"cache_dir": "~/.cache/zimage", "allowed_hosts": "(none)"}.get(opt.name, opt.default)
        if isinstance(default, bool):
            default = "on" if default else "off"
        group.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.name.upper(),
                           help=f"{opt.help} [env {opt.env}; default {default}]",
                           **({"nargs": "?", "const": opt.const} if opt.const is not None else {}))
    return parser


def build_arg_parser() -> argparse.ArgumentParser:
    return add_options(argparse.ArgumentParser(
        description="Z-Image-Turbo studio. Every flag also reads ZIMAGE_<NAME> from the environment; flags win."))
