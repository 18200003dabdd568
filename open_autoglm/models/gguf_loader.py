"""Reading GGUF files (llama.cpp's format) as Hugging Face checkpoints.

A GGUF holds the config as metadata under llama.cpp's key names, the tokenizer as vocabulary/merges
metadata, and tensors under llama.cpp names, possibly block-quantized. We turn each into its HF
counterpart: a config.json dict, a fast tokenizer, and `model.layers.N...` float32 tensors.
The tokenizer and generation config come from `gguf_tokenizer`.

Tensors are read from a memory map and dequantized one at a time with `gguf.quants.dequantize`,
so peak memory is one tensor, whatever the file size.

Name map (llama.cpp -> HF, `N` the layer):

    token_embd          model.embed_tokens        blk.N.attn_norm   model.layers.N.input_layernorm
    output_norm         model.norm                blk.N.ffn_norm    model.layers.N.post_attention_layernorm
    output              lm_head (absent: tied)    blk.N.attn_q/k/v  model.layers.N.self_attn.q/k/v_proj
    blk.N.attn_output   ...self_attn.o_proj       blk.N.ffn_gate/up/down  model.layers.N.mlp.gate/up/down_proj
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from open_autoglm.errors import ModelLoadError
from open_autoglm.models.gguf_tokenizer import build_tokenizer, generation_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

QType = gguf.GGMLQuantizationType

# llama.cpp architecture -> (HF class, HF model_type, whether llama.cpp's converter permuted q/k rows).
_ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


@dataclass
class GGUFModel:
    """What a GGUF file describes, in Hugging Face terms."""

    config: dict  # a config.json dict
    generation_config: dict  # a generation_config.json dict: bos_token_id, eos_token_id (, pad_token_id)
    tokenizer: PreTrainedTokenizerFast  # carries the file's chat template


@dataclass(frozen=True)
class _TensorPlan:
    """One GGUF tensor and what it becomes: its HF name and shape, and the q/k row un-permutation."""

    tensor: Any  # gguf.ReaderTensor
    hf_name: str
    hf_shape: tuple[int, ...]
    rope_heads: int | None  # heads to un-permute over (q: num_heads, k: num_kv_heads); None: leave as is


# ---------------------------------------------------------------------------------------------------
# Opening and metadata


def _open(path: str | os.PathLike) -> tuple[Path, gguf.GGUFReader]:
    """A reader over `path`; any malformed header, bad magic or tensor data past the end -> ModelLoadError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)  # memory-maps; builds every tensor view, so a cut file fails here
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on corrupt input
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {sorted(_ARCHITECTURES)})"
        )
    return path, reader


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


def _f32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _build_config(reader: gguf.GGUFReader, path: Path) -> dict:
    arch = _field(reader, "general.architecture")
    hf_class, model_type, _ = _ARCHITECTURES[arch]
    names = {t.name for t in reader.tensors}

    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    def need(key: str) -> Any:
        if (value := get(key)) is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks '{arch}.{key}'")
        return value

    hidden_size, num_heads = int(need("embedding_length")), int(need("attention.head_count"))
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
        raise ModelLoadError(f"{path}: per-layer head_count_kv is not supported")
    head_dim = int(get("attention.key_length", hidden_size // num_heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ModelLoadError(
            f"{path}: partial rotary embeddings (rope.dimension_count != head_dim) not supported"
        )
    if get("rope.scaling.type", "none") != "none" or "rope_freqs.weight" in names:
        raise ModelLoadError(
            f"{path}: rope scaling (rope.scaling.* / rope_freqs.weight) is not supported yet"
        )
    if "token_embd.weight" not in names:
        raise ModelLoadError(f"{path}: no token_embd.weight tensor")
    vocab_size = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in names,
    }
    if model_type == "llama":
        config |= {"head_dim": head_dim, "attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": False}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        gguf_key = "padding_token_id" if key == "pad_token_id" else key
        if (token_id := _field(reader, f"tokenizer.ggml.{gguf_key}")) is not None:
            config[key] = int(token_id)
    return config


# ---------------------------------------------------------------------------------------------------
# Tensors


@cache
def _can_dequantize(qtype: QType) -> bool:
    """Whether gguf.quants dequantizes `qtype` (probed on one all-zero block)."""
    if qtype in (QType.F32, QType.F16):
        return True
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    except Exception:  # implemented; a zero block just is not valid input for it
        return True
    return True


def _hf_name(name: str) -> str | None:
    if m := _LAYER_RE.fullmatch(name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    if m := _GLOBAL_RE.fullmatch(name):
        part, kind = m.groups()
        return f"{_GLOBAL_NAMES[part]}.{kind}" if part in _GLOBAL_NAMES else None
    return None


def _plan(reader: gguf.GGUFReader, path: Path, config: dict) -> list[_TensorPlan]:
    """Map every tensor before reading any: unknown names and types fail before work starts."""
    permuted = _ARCHITECTURES[config["model_type"]][2]
    rope_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    plans = []
    for t in reader.tensors:
        hf_name = _hf_name(t.name)
        if hf_name is None:
            raise ModelLoadError(f"{path}: tensor {t.name!r} has no Hugging Face counterpart")
        if not _can_dequantize(t.tensor_type):
            raise ModelLoadError(f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name}")
        part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        heads = rope_heads.get(part) if permuted else None
        hf_shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dims fastest-first
        plans.append(_TensorPlan(t, hf_name, hf_shape, heads))
    return plans


def _unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row reorder, so HF's `rotate_half` rope applies.

    HF rotates dim i of a head with dim i + D/2; llama.cpp's rope rotates 2i with 2i + 1. Its converter
    therefore interleaves each head's two halves: GGUF row 2i + p holds HF row p * D/2 + i (p in {0, 1}).
    Same for biases (1-D).
    """
    half = w.shape[0] // num_heads // 2
    rows = w.reshape(num_heads, half, 2, *w.shape[1:])  # [H, D/2, 2, ...]: GGUF order
    return rows.swapaxes(1, 2).reshape(w.shape)  # [H, 2, D/2, ...] -> [H*D, ...]: HF order


def _dequantize(plan: _TensorPlan, path: Path) -> torch.Tensor:
    t = plan.tensor
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(plan.hf_shape)  # float32
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot dequantize {t.name!r} ({t.tensor_type.name}): {e}") from e
    if plan.rope_heads is not None:
        w = _unpermute_rope_rows(w, plan.rope_heads)
    return torch.from_numpy(np.array(w, dtype=np.float32))  # own copy: the source may be the read-only map


def _iter_plans(plans: list[_TensorPlan], path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for plan in plans:
        yield plan.hf_name, _dequantize(plan, path)


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Config, generation config and tokenizer of a GGUF file (no tensor data is read)."""
    path, reader = _open(path)
    config = _build_config(reader, path)
    config["torch_dtype"] = str(_storage_dtype(_plan(reader, path, config))).removeprefix("torch.")
    return GGUFModel(config, generation_config(reader, config), build_tokenizer(path, reader, config))


def iter_gguf_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor in HF shape) for each tensor, dequantized one at a time.

    Tied models have no `lm_head.weight` (config["tie_word_embeddings"] is True).
    """
    path, reader = _open(path)  # eager: a bad file fails here, not at the first next()
    return _iter_plans(_plan(reader, path, _build_config(reader, path)), path)


# ---------------------------------------------------------------------------------------------------
# Conversion to a Hugging Face folder


def _storage_dtype(plans: list[_TensorPlan]) -> torch.dtype:
    """The one dtype that holds every dequantized tensor exactly.

    | source types                          | stored as |
    |---------------------------------------|-----------|
    | all F16 (+ F32 tensors exact in f16)  | float16   |
    | all BF16 (+ F32 tensors exact in bf16)| bfloat16  |
    | anything quantized, or mixed          | float32   |

    Quantized values are `scale * q (+ min)` computed in float32, which no 16-bit type holds exactly.
    llama.cpp keeps norms in F32 even in F16 files; those are checked value by value (they are small).
    """
    types = {p.tensor.tensor_type for p in plans}
    narrow = types - {QType.F32}
    candidates = {QType.F16: torch.float16, QType.BF16: torch.bfloat16}
    if len(narrow) != 1 or (qtype := next(iter(narrow))) not in candidates:
        return torch.float32
    dtype = candidates[qtype]
    for p in plans:
        if p.tensor.tensor_type == QType.F32:
            w = torch.from_numpy(np.array(p.tensor.data, dtype=np.float32))
            if not torch.equal(w.to(dtype).float(), w):
                return torch.float32
    return dtype


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _write_safetensors(
    file: Path, plans: list[_TensorPlan], tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> None:
    """Stream tensors into a .safetensors file: the header (from the plan) first, then each tensor's bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    itemsize, offset = torch.finfo(dtype).bits // 8, 0
    for p in plans:
        num_bytes = itemsize * int(np.prod(p.hf_shape))
        header[p.hf_name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(p.hf_shape),
            "data_offsets": [offset, offset + num_bytes],
        }
        offset += num_bytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data start to 8 bytes
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for p, (name, tensor) in zip(plans, tensors, strict=True):
            assert name == p.hf_name and tuple(tensor.shape) == p.hf_shape, (name, p.hf_name)
            f.write(tensor.to(dtype).contiguous().view(torch.uint8).numpy().data)  # raw bytes, no copy


def gguf_to_hf_folder(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True
) -> Path:
    """Convert a GGUF file into a Hugging Face folder at `out_dir` (which must not exist yet).

    Writes config.json, generation_config.json, model.safetensors (dtype: see `_storage_dtype`; float32
    for quantized sources, so the folder computes exactly what the GGUF does), tokenizer.json and
    tokenizer_config.json (with the chat template). Everything is written into a temporary sibling
    folder that is renamed into place at the end, so `out_dir` is either complete or absent.
    """
    path, reader = _open(gguf_path)
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    config = _build_config(reader, path)
    plans = _plan(reader, path, config)
    dtype = _storage_dtype(plans)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tokenizer = build_tokenizer(path, reader, config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = generation_config(reader, config)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save_pretrained(tmp, save_jinja_files=False)  # chat template inside tokenizer_config.json
        bar = tqdm(
            _iter_plans(plans, path),
            total=len(plans),
            desc=f"Converting {path.name}",
            unit="tensor",
            disable=not progress,
        )
        _write_safetensors(tmp / "model.safetensors", plans, iter(bar), dtype)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
