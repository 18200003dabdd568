"""`ModelConfig`: a model's config.json read with `json`, without importing transformers.

`AutoConfig.from_pretrained` imports the architecture's config module, and that drags in
transformers' validators, activations, kernel hub and torch.distributed.tensor: seconds of every
cold start (about 10 s on the GPU machine). For the architectures we implement, the config is
plain data; this module reproduces what transformers 5 makes of it:

| step                         | transformers 5 (configuration_*.py, configuration_utils.py)   |
|------------------------------|----------------------------------------------------------------|
| defaults                     | the config class's dataclass fields, per model type           |
| per-architecture __post_init__ | head_dim / num_key_value_heads / sliding window / GLM-4 EOS |
| dtype                        | `dtype`, else legacy `torch_dtype`, as a torch.dtype           |
| rope                         | `rope_scaling` / `rope_theta` / `partial_rotary_factor` folded |
|                              | into one `rope_parameters` dict with `rope_type`               |
| validation                   | strict field types, rope keys, layer types: anything we cannot |
|                              | vouch for raises `UnsupportedConfig` -> the caller uses AutoConfig |

`to_dict()` equals transformers' `to_dict()` (except `transformers_version`), so live updates
compare configs the same way whichever of the two read them. tests/test_model_config.py checks
every attribute against AutoConfig.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UnsupportedConfig(ValueError):
    """config.json needs transformers' own config class (unknown model type, unusual keys, or a
    value transformers would reject: let it produce the error)."""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _float(v) -> bool:  # strict: transformers rejects an int where a float is declared
    return isinstance(v, float)


def _number(v) -> bool:
    return _int(v) or _float(v)


def _bool(v) -> bool:
    return isinstance(v, bool)


def _str(v) -> bool:
    return isinstance(v, str)


def _ids(v) -> bool:
    return v is None or _int(v) or (isinstance(v, list) and all(_int(i) for i in v))


def _unit(v) -> bool:
    return _float(v) and 0.0 <= v <= 1.0


def _any(v) -> bool:
    return True


# PreTrainedConfig's own fields: name -> (default, check).
_BASE: dict[str, tuple[Any, Callable]] = {
    "transformers_version": (None, _any),
    "architectures": (None, _any),
    "output_hidden_states": (False, _bool),
    "return_dict": (True, _bool),
    "dtype": (None, _opt(_str)),
    "chunk_size_feed_forward": (0, _int),
    "is_encoder_decoder": (False, _bool),
    "id2label": ({0: "LABEL_0", 1: "LABEL_1"}, _any),
    "label2id": ({"LABEL_0": 0, "LABEL_1": 1}, _any),
    "problem_type": (None, _any),
}
_COMMON: dict[str, tuple[Any, Callable]] = {
    "hidden_act": ("silu", _str), "initializer_range": (0.02, _float),
    "rms_norm_eps": (1e-6, _float), "use_cache": (True, _bool), "tie_word_embeddings": (False, _bool),
    "rope_parameters": (None, _opt(lambda v: isinstance(v, dict))), "attention_dropout": (0.0, _number),
    "pad_token_id": (None, _opt(_int)), "bos_token_id": (None, _opt(_int)), "eos_token_id": (None, _ids),
}


def _shape(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, max_pos: int) -> dict:
    return {"vocab_size": (vocab, _int), "hidden_size": (hidden, _int), "intermediate_size": (intermediate, _int),
            "num_hidden_layers": (layers, _int), "num_attention_heads": (heads, _int),
            "max_position_embeddings": (max_pos, _int)}


# The dataclass fields of LlamaConfig / Qwen2Config / Glm4Config (transformers 5): defaults and types.
FIELDS: dict[str, dict[str, tuple[Any, Callable]]] = {
    "llama": {**_BASE, **_COMMON, **_shape(32000, 4096, 11008, 32, 32, 2048),
              "num_key_value_heads": (None, _opt(_int)), "initializer_range": (0.02, _unit),
              "bos_token_id": (1, _opt(_int)), "eos_token_id": (2, _ids), "pretraining_tp": (1, _opt(_int)),
              "attention_bias": (False, _bool), "mlp_bias": (False, _bool), "head_dim": (None, _opt(_int)),
              "attention_dropout": (0.0, _opt(_number))},
    "qwen2": {**_BASE, **_COMMON, **_shape(151936, 4096, 22016, 32, 32, 32768),
              "num_key_value_heads": (32, _opt(_int)), "use_sliding_window": (False, _bool),
              "sliding_window": (4096, _opt(_int)), "max_window_layers": (28, _int),
              "layer_types": (None, _opt(lambda v: isinstance(v, list) and all(_str(t) for t in v)))},
    "glm4": {**_BASE, **_COMMON, **_shape(151552, 4096, 13696, 40, 32, 131072),
             "num_key_value_heads": (2, _int), "head_dim": (128, _int), "rms_norm_eps": (0.00000015625, _float),
             "pad_token_id": (151329, _opt(_int)), "attention_bias": (True, _bool)},
}
_GLM4_EOS = [151329, 151336, 151338]
DEFAULT_THETA = 10_000.0

# Keys transformers pops from config.json without keeping them (generation settings belong in
# generation_config.json; use_cache is a field of every config above, so it stays).
_GENERATION_KEYS = frozenset((
    "assistant_confidence_threshold assistant_lookbehind bad_words_ids begin_suppress_tokens diversity_penalty "
    "do_sample early_stopping encoder_no_repeat_ngram_size encoder_repetition_penalty epsilon_cutoff eta_cutoff "
    "exponential_decay_length_penalty forced_bos_token_id forced_eos_token_id length_penalty max_length "
    "min_length no_repeat_ngram_size num_assistant_tokens num_assistant_tokens_schedule num_beam_groups num_beams "
    "num_return_sequences output_scores remove_invalid_values repetition_penalty return_dict_in_generate "
    "suppress_tokens target_lookbehind temperature top_k top_p typical_p").split())
# Keys that are properties or special cases of PreTrainedConfig (or remote code, sub-configs,
# classification heads, per-layer configs): transformers' own class handles them.
_DEFER_KEYS = frozenset((
    "auto_map attn_implementation experts_implementation per_layer_config per_layer_attributes num_labels "
    "id2label label2id problem_type use_return_dict name_or_path is_heterogeneous attribute_map "
    "allow_global_per_layer_attribute_access serialize_explicit_per_layer_config sub_configs text_config "
    "vision_config base_config_key extra_files extra_config_files default_theta default_rope_type "
    "ignore_keys_at_rope_validation mlp_layer_types mtp_layer_types original_max_position_embeddings num_heads "
    "embed_dim output_attentions base_model_tp_plan base_model_pp_plan base_model_ep_plan base_model_fsdp_plan"
    ).split())
# rope_type -> keys transformers requires in rope_parameters (validate_rope raises without them).
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}
_LAYER_TYPES = ("full_attention", "sliding_attention")


class ModelConfig:
    """A transformers-compatible config for llama / qwen2 / glm4, read-only. Every key of
    `to_dict()` is an attribute; `head_dim` is always set (hidden_size // heads where the
    architecture has no such field, which is what its modeling code uses); `dtype` and
    `torch_dtype` are torch dtypes (or None), as in transformers."""

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", values)

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        """config.json of `folder`; UnsupportedConfig if transformers must read it."""
        try:
            raw = json.loads((folder / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnsupportedConfig(f"unreadable: {e}") from None
        return cls.from_dict(raw, name_or_path=str(folder))

    @classmethod
    def from_dict(cls, raw: dict, name_or_path: str = "") -> ModelConfig:
        if not isinstance(raw, dict) or raw.get("model_type") not in FIELDS:
            raise UnsupportedConfig(f"model_type {raw.get('model_type') if isinstance(raw, dict) else None!r}")
        if deferred := sorted(k for k in raw if k in _DEFER_KEYS or (k.startswith("_") and k != "_commit_hash"
                                                                      and k != "_name_or_path")):
            raise UnsupportedConfig(f"keys {deferred}")
        return cls(_normalize(copy.deepcopy(raw), name_or_path))

    def __getattr__(self, name: str) -> Any:  # called only when normal lookup fails
        if name.startswith("__") or name == "_values":
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} ({self._values['model_type']}) has no {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ModelConfig is read-only")

    def __reduce__(self):  # copy / pickle through the values
        return type(self), (copy.deepcopy(self._values),)

    @property
    def head_dim(self) -> int:
        return self._values.get("head_dim") or self._values["hidden_size"] // self._values["num_attention_heads"]

    @property
    def dtype(self):
        name = self._values.get("dtype")
        if name is None:
            return None
        import torch

        return getattr(torch, name)

    @property
    def torch_dtype(self):
        return self.dtype

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._values)

    def __repr__(self) -> str:
        return f"ModelConfig({json.dumps(self._values, default=str, sort_keys=True)})"


def _normalize(raw: dict, name_or_path: str) -> dict:
    """raw config.json -> transformers' to_dict(), step by step as configuration_*.py does it."""
    model_type = raw.pop("model_type")
    fields = FIELDS[model_type]
    values = {name: raw.pop(name, copy.deepcopy(default)) for name, (default, _) in fields.items()}
    for name, (_, check) in fields.items():
        if not check(values[name]):
            raise UnsupportedConfig(f"{name}={values[name]!r}")
    if values["num_attention_heads"] <= 0:
        raise UnsupportedConfig("num_attention_heads <= 0")
    partial_rotary_factor = raw.pop("partial_rotary_factor", 0.5 if model_type == "glm4" else None)
    _post_init(model_type, values)
    torch_dtype = raw.pop("torch_dtype", None)
    values["dtype"] = _dtype_name(values["dtype"] if values["dtype"] is not None else torch_dtype)
    _fold_rope(values, raw.pop("rope_scaling", None), raw.pop("rope_theta", DEFAULT_THETA), partial_rotary_factor)
    for key in ("_commit_hash", "_name_or_path", *_GENERATION_KEYS):
        raw.pop(key, None)
    values.update(raw)  # other keys become attributes as they are
    values |= {"_name_or_path": name_or_path, "model_type": model_type, "output_attentions": False}
    _validate(values, partial_rotary_factor)
    return values


def _post_init(model_type: str, v: dict) -> None:
    """The config classes' __post_init__."""
    if model_type == "llama":
        if v["head_dim"] is None:
            v["head_dim"] = v["hidden_size"] // v["num_attention_heads"]
        if v["hidden_size"] % v["num_attention_heads"]:
            raise UnsupportedConfig("hidden_size not a multiple of num_attention_heads")
    if model_type == "qwen2":
        v["sliding_window"] = v["sliding_window"] if v["use_sliding_window"] else None
        if v["layer_types"] is None:
            v["layer_types"] = ["sliding_attention" if v["sliding_window"] is not None and i >= v["max_window_layers"]
                                else "full_attention" for i in range(v["num_hidden_layers"])]
    if model_type == "glm4" and v["eos_token_id"] is None:
        v["eos_token_id"] = list(_GLM4_EOS)
    if v["num_key_value_heads"] is None:
        v["num_key_value_heads"] = v["num_attention_heads"]


def _dtype_name(name: str | None) -> str | None:
    """transformers turns the name into a torch.dtype (to_dict writes it back): "float" -> "float32"."""
    if name is None:
        return None
    import torch

    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise UnsupportedConfig(f"dtype {name!r}")
    return str(dtype).removeprefix("torch.")


def _fold_rope(v: dict, rope_scaling, rope_theta, partial_rotary_factor) -> None:
    """RotaryEmbeddingConfigMixin.convert_rope_params_to_dict + standardize_rope_params (flat case):
    rope_scaling replaces rope_parameters; rope_theta and partial_rotary_factor fill it in."""
    params = rope_scaling or v["rope_parameters"]
    params = params if params is not None else {}
    if not isinstance(params, dict) or any(isinstance(x, dict) or k in _LAYER_TYPES for k, x in params.items()):
        raise UnsupportedConfig(f"rope parameters {params!r}")  # nested per layer type
    params.setdefault("rope_theta", rope_theta)
    if partial_rotary_factor is not None:
        params.setdefault("partial_rotary_factor", partial_rotary_factor)
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", v["max_position_embeddings"])
    v["rope_parameters"] = params


def _validate(v: dict, partial_rotary_factor) -> None:
    """The checks transformers' strict validation would fail on, for what we read ourselves."""
    params = v["rope_parameters"]
    rope_type = params["rope_type"]
    if rope_type not in _ROPE_REQUIRED or any(k not in params for k in _ROPE_REQUIRED[rope_type]):
        raise UnsupportedConfig(f"rope parameters {params!r}")
    numeric = ("rope_theta", "partial_rotary_factor", *_ROPE_REQUIRED[rope_type])
    if not all(_number(params[k]) for k in numeric if k in params):
        raise UnsupportedConfig(f"rope parameters {params!r}")
    head_dim = v.get("head_dim")
    if head_dim is not None and (not _int(head_dim) or (head_dim > 4 and head_dim % 2
                                                        and int(head_dim * params.get("partial_rotary_factor", 1.0))
                                                        == head_dim)):
        raise UnsupportedConfig(f"head_dim {head_dim!r}")
    layer_types = v.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != v["num_hidden_layers"]
                                    or any(t not in _LAYER_TYPES for t in layer_types)):
        raise UnsupportedConfig(f"layer_types {layer_types!r}")
