"""Build a model from a Hugging Face folder or a GGUF file: config, tokenizer, weights, EOS ids.

Tensors stream one at a time from memory-mapped safetensors shards (or the GGUF file) straight
into the already-allocated parameters, so peak host memory stays near one tensor, not one model.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from open_autoglm.errors import ModelLoadError
from open_autoglm.models.model_config import ModelConfig, UnsupportedConfig
from open_autoglm.models.registry import model_class_for
from open_autoglm.worker.weights import load_weights

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ModelSource:
    """What a model path holds, before any weights are read."""

    path: Path
    hf_config: object
    tokenizer: object
    eos_token_ids: tuple[int, ...]
    is_gguf: bool

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.is_gguf:
            from open_autoglm.models.gguf_loader import iter_gguf_tensors

            return iter_gguf_tensors(self.path)
        return iter_safetensors(self.path)


def open_source(path: Path, tokenizer=None) -> ModelSource:
    """Read config, tokenizer and EOS ids of an HF folder or a .gguf file. A live update passes the
    live `tokenizer` when the folder's tokenizer files are the same (loading one holds the GIL for
    a few hundred ms: the engine thread would stall)."""
    if path.suffix == ".gguf":
        return _open_gguf(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a model folder (no config.json)")
    hf_config = _read_config(path)
    model_class_for(hf_config)  # fail early on unsupported architectures
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(path, hf_config)
    generation = _read_json(path / "generation_config.json")
    eos = _eos_ids(generation.get("eos_token_id"), hf_config.eos_token_id, tokenizer.eos_token_id)
    return ModelSource(path, hf_config, tokenizer, eos, is_gguf=False)


def _read_config(path: Path):
    """A ModelConfig straight from config.json for the architectures we implement (no transformers
    config module: seconds of imports); transformers' AutoConfig for anything else, and to report
    errors in a config it would reject."""
    try:
        return ModelConfig.from_folder(path)
    except UnsupportedConfig as e:
        logger.debug("%s: read by transformers' AutoConfig (%s)", path / "config.json", e)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a bad config
        raise ModelLoadError(f"{path / 'config.json'}: cannot read config: {e}") from e


def _load_tokenizer(path: Path, hf_config):
    """The class AutoTokenizer would pick, loaded directly (AutoTokenizer's module imports
    transformers' model-loading machinery); AutoTokenizer itself when we cannot tell, or on failure."""
    name = _tokenizer_class_name(path, hf_config)
    if name is not None:
        try:
            import transformers

            cls = getattr(transformers, name, None) or getattr(transformers, name + "Fast", None)
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase):
                if cls.__name__ == "PythonBackend":  # what AutoTokenizer does with PreTrainedTokenizer(Fast)
                    cls = transformers.TokenizersBackend
                return cls.from_pretrained(path)
        except Exception as e:
            logger.debug("%s: tokenizer class %s failed (%s); using AutoTokenizer", path, name, e)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load tokenizer (tokenizer.json / tokenizer_config.json): {e}") from e


# AutoTokenizer's choice (transformers 5, models/auto/tokenization_auto.py) for the model types
# ModelConfig reads, when tokenizer_config.json names a class and has no auto_map:
#   1. config path matches MODEL_IDS_TO_TOKENIZERS_BACKEND                    -> TokenizersBackend
#   2. the model type registers a class other than the named one: qwen2 (its
#      hub class is "known incorrect") -> Qwen2Tokenizer; glm4 -> TokenizersBackend
#   3. llama (none registered): LlamaTokenizer[Fast] over a ByteLevel tokenizer.json -> TokenizersBackend,
#      else the named class (without "Fast"; PythonBackend -> TokenizersBackend)
# tests/test_model_config.py checks these tables and the result against AutoTokenizer.
TOKENIZER_FOR_MODEL_TYPE = {"llama": None, "qwen2": "Qwen2Tokenizer", "glm4": "TokenizersBackend"}
TOKENIZERS_BACKEND_IDS = (
    "deepseek-ai/deepseek-r1-distill-llama-*", "deepseek-ai/deepseek-coder-*", "allenai/dolma2-tokenizer",
    "google/umt5-small", "naver-clova-ix/donut-*", "salesforce/blip2-opt-*", "salesforce/blip2-flan-t5-*",
    "salesforce/instructblip-flan-t5-*", "stepfun-ai/step-3.7-*",
)


def _tokenizer_class_name(path: Path, hf_config) -> str | None:
    """The transformers tokenizer class AutoTokenizer would load for `path`, or None (ask AutoTokenizer)."""
    if not isinstance(hf_config, ModelConfig) or hf_config.model_type not in TOKENIZER_FOR_MODEL_TYPE:
        return None
    try:
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    declared = tokenizer_config.get("tokenizer_class") if isinstance(tokenizer_config, dict) else None
    if not isinstance(declared, str) or "auto_map" in tokenizer_config:
        return None
    if any(fnmatch.fnmatch(str(path).lower(), pattern) for pattern in TOKENIZERS_BACKEND_IDS):
        return "TokenizersBackend"
    if forced := TOKENIZER_FOR_MODEL_TYPE[hf_config.model_type]:
        return forced
    declared = declared.removesuffix("Fast")
    if declared == "LlamaTokenizer" and _byte_level_tokenizer_json(path):
        return "TokenizersBackend"
    return declared


def _byte_level_tokenizer_json(path: Path) -> bool:
    """TokenizersBackend._tokenizer_json_has_byte_level: the file mentions "ByteLevel"."""
    try:
        return '"ByteLevel"' in (path / "tokenizer.json").read_text(encoding="utf-8")
    except OSError:
        return False


def _open_gguf(path: Path) -> ModelSource:
    from open_autoglm.models.gguf_loader import read_gguf

    gguf = read_gguf(path)
    config = {"model_type": "llama", **gguf.config}
    try:
        hf_config = ModelConfig.from_dict(config)
    except UnsupportedConfig:
        from transformers import CONFIG_MAPPING

        hf_config = CONFIG_MAPPING[config.pop("model_type")](**config)
    model_class_for(hf_config)
    eos = _eos_ids(gguf.generation_config.get("eos_token_id"), hf_config.eos_token_id, gguf.tokenizer.eos_token_id)
    return ModelSource(path, hf_config, gguf.tokenizer, eos, is_gguf=True)


def build_model(source: ModelSource, dtype: torch.dtype, device: torch.device, backend,
                random_weights: bool = False) -> nn.Module:
    """Allocate the model once on `device` and fill it from the checkpoint (strict), or with
    random values of the right scale when `random_weights` (benchmarks of real shapes)."""
    cls = model_class_for(source.hf_config)
    # Parameters take `dtype` from the default; rotary tables are built explicitly in float32.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(source.hf_config, backend)
    finally:
        torch.set_default_dtype(previous)
    if random_weights:
        init_random(model)
    else:
        load_weights(model, source.tensors())
    model.eval()
    return model


@torch.no_grad()
def init_random(model: nn.Module, std: float = 0.02) -> None:
    """Norm weights 1, everything else N(0, std): activations stay finite through every layer."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std)


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{file}: corrupt or truncated safetensors file: {e}") from e


def resolve_dtype(name: str, device: torch.device, hf_config) -> torch.dtype:
    if name != "auto":
        return TORCH_DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in bf16 are slow and less exact
    declared = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", "") or "")
    return torch.float16 if declared.endswith("float16") and "bfloat" not in declared else torch.bfloat16


def _eos_ids(*candidates) -> tuple[int, ...]:
    ids: list[int] = []
    for c in candidates:
        for i in c if isinstance(c, (list, tuple)) else [c]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
        if ids:
            break
    return tuple(ids)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON: {e}") from e
