"""Engine options: one frozen, documented dataclass, and the YAML config file that maps onto it.

Every field's `help` also feeds the CLI's `--help`. Values derived at run time (number of KV
blocks, the resolved device) live on the objects that derive them, never in this config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from open_autoglm.errors import ConfigError

DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
LOAD_STRATEGIES = ("prewarm", "lazy", "resident")
LOAD_FORMATS = ("auto", "dummy")


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = _opt(None, "catalog name, Hugging Face folder or .gguf file (default: smollm2-135m)")
    device: str = _opt("auto", "where to run: cuda if available, else cpu", DEVICES)
    dtype: str = _opt("auto", "weight and activation dtype (auto: bfloat16 on GPU, float32 on CPU)", DTYPES)
    block_size: int = _opt(16, "tokens per KV-cache block (page)")
    max_model_len: int | None = _opt(None, "longest prompt + output in tokens (default: the model's context length)")
    max_num_seqs: int = _opt(256, "most sequences in one engine step (batch size)")
    max_num_batched_tokens: int = _opt(2048, "token budget of one engine step; longer prompts are prefilled in chunks")
    enable_prefix_caching: bool = _opt(True, "reuse KV blocks of identical prompt prefixes")
    gpu_memory_utilization: float = _opt(0.90, "fraction of GPU memory the engine may use (weights + KV cache)")
    kv_cache_bytes: int = _opt(1 << 30, "KV-cache size in bytes on CPU")
    num_kv_blocks: int | None = _opt(None, "force the number of KV blocks (overrides the sizing above)")
    attention_backend: str = _opt("auto", "attention implementation: triton on GPU, torch reference on CPU", ATTENTION_BACKENDS)
    cuda_graphs: bool = _opt(True, "capture CUDA graphs for decode steps (GPU only)")
    async_scheduling: str = _opt("auto", "overlap the host's work with the GPU: launch decode step N+1 before reading "
                                         "step N's tokens (auto: on with CUDA)", ("auto", "on", "off"))
    compile: bool = _opt(False, "reserved for torch.compile of the model; not implemented yet (accepted, no effect): "
                                "our fused Triton kernels and CUDA graphs cover what it would fuse")
    seed: int = _opt(0, "seed for requests that give none")
    model_cache_dir: str | None = _opt(None, "where pulled models live (default: ~/.cache/open-autoglm)")
    load_strategy: str = _opt("prewarm", "prewarm: load and warm up at start; lazy: on first request; resident: keep versions loaded", LOAD_STRATEGIES)
    load_format: str = _opt("auto", "auto: read the checkpoint; dummy: random weights of the right shapes (benchmarks)", LOAD_FORMATS)
    max_queued_requests: int = _opt(1024, "waiting requests the server accepts before answering 429")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f.name, f"invalid value {value!r}; allowed: {', '.join(choices)}")
        _positive(self, "block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes", "max_queued_requests")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError("max_model_len", f"must be > 0, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ConfigError("num_kv_blocks", f"must be > 0, got {self.num_kv_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """Build from keyword options, rejecting unknown names with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in known:
                raise ConfigError(key, f"unknown option; known options: {', '.join(sorted(known))}")
        return cls(**options)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def _positive(cfg: EngineConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(name, f"must be a positive integer, got {value!r}")


# --- optimize_level: one knob for users of the simple API -------------------------------------
# level | prefix cache | chunked prefill | GPU kernels (Triton) | CUDA graphs | torch.compile
#   0   |      -       |   whole prompt  |   torch reference    |      -      |      -
#   1   |     yes      |      yes        |   torch reference    |      -      |      -
#   2   |     yes      |      yes        |       yes            |     yes     |      -
#   3   |     yes      |      yes        |       yes            |     yes     |     yes
# On CPU levels 2 and 3 run like level 1 (the GPU features have nothing to run on).
# torch.compile (level 3) does not exist yet: level 3 runs exactly like level 2 for now.
OPTIMIZE_LEVELS = {
    0: dict(enable_prefix_caching=False, attention_backend="torch", cuda_graphs=False, compile=False,
            max_num_batched_tokens=1 << 16),
    1: dict(enable_prefix_caching=True, attention_backend="torch", cuda_graphs=False, compile=False),
    2: dict(enable_prefix_caching=True, attention_backend="auto", cuda_graphs=True, compile=False),
    3: dict(enable_prefix_caching=True, attention_backend="auto", cuda_graphs=True, compile=True),
}


def options_for_level(level: int) -> dict[str, Any]:
    if level not in OPTIMIZE_LEVELS:
        raise ConfigError("optimize_level", f"invalid value {level!r}; allowed: 0, 1, 2, 3")
    return dict(OPTIMIZE_LEVELS[level])


# --- YAML config file ---------------------------------------------------------------------------
# Keys of the project spec, mapped onto engine options. Engine options may also appear directly.
SPEC_BACKENDS = {"autoglm": "auto", "auto": "auto", "torch": "torch", "triton": "triton"}


def load_config_file(path: str | Path, **overrides: Any) -> EngineConfig:
    """Read a YAML config; spec keys (`backend`, `max_batch_size`, `dynamic_shape`, `enable_cache`)
    are translated, engine option names pass through, anything else is an error naming the key."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError("config", f"{path} must hold a mapping of keys to values")
    options = translate_spec_keys(raw)
    options.update({k: v for k, v in overrides.items() if v is not None})
    return EngineConfig.from_options(**options)


def translate_spec_keys(raw: dict[str, Any]) -> dict[str, Any]:
    options = dict(raw)
    if "backend" in options:
        backend = options.pop("backend")
        if backend not in SPEC_BACKENDS:
            raise ConfigError("backend", f"unsupported backend {backend!r}; available backends: {', '.join(SPEC_BACKENDS)}")
        options["attention_backend"] = SPEC_BACKENDS[backend]
    if "max_batch_size" in options:
        options["max_num_seqs"] = options.pop("max_batch_size")
    if "enable_cache" in options:
        value = options.pop("enable_cache")
        if not isinstance(value, bool):
            raise ConfigError("enable_cache", f"must be true or false, got {value!r}")
        options["enable_prefix_caching"] = value
    if "dynamic_shape" in options:
        options.update(_dynamic_shape(options.pop("dynamic_shape")))
    return options


def _dynamic_shape(shape: Any) -> dict[str, Any]:
    """`dynamic_shape: {input_ids: [min, opt, max]}` — sequence lengths the engine must accept.
    max becomes max_model_len; opt sizes the per-step token budget (at least max so that a whole
    prompt can be prefilled in one step)."""
    if not isinstance(shape, dict) or set(shape) != {"input_ids"}:
        raise ConfigError("dynamic_shape", "must be a mapping with the single key input_ids: [min, opt, max]")
    dims = shape["input_ids"]
    if (not isinstance(dims, list) or len(dims) != 3 or not all(isinstance(d, int) and d > 0 for d in dims)
            or not dims[0] <= dims[1] <= dims[2]):
        raise ConfigError("dynamic_shape.input_ids", f"must be [min, opt, max] positive integers with min <= opt <= max, got {dims!r}")
    return {"max_model_len": dims[2], "max_num_batched_tokens": max(dims[1], dims[2])}
