"""Build a model from a Hugging Face folder or a GGUF file: config, tokenizer, weights, EOS ids.

Tensors stream one at a time from memory-mapped safetensors shards (or the GGUF file) straight
into the already-allocated parameters, so peak host memory stays near one tensor, not one model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from open_autoglm.errors import ModelLoadError
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


def open_source(path: Path) -> ModelSource:
    """Read config, tokenizer and EOS ids of an HF folder or a .gguf file."""
    if path.suffix == ".gguf":
        return _open_gguf(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a model folder (no config.json)")
    from transformers import AutoConfig, AutoTokenizer

    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a bad config
        raise ModelLoadError(f"{path / 'config.json'}: cannot read config: {e}") from e
    model_class_for(hf_config)  # fail early on unsupported architectures
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load tokenizer (tokenizer.json / tokenizer_config.json): {e}") from e
    generation = _read_json(path / "generation_config.json")
    eos = _eos_ids(generation.get("eos_token_id"), hf_config.eos_token_id, tokenizer.eos_token_id)
    return ModelSource(path, hf_config, tokenizer, eos, is_gguf=False)


def _open_gguf(path: Path) -> ModelSource:
    from transformers import CONFIG_MAPPING

    from open_autoglm.models.gguf_loader import read_gguf

    gguf = read_gguf(path)
    config = dict(gguf.config)
    hf_config = CONFIG_MAPPING[config.pop("model_type", "llama")](**config)
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
