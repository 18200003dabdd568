"""Shared by the test_registry* modules (no tests here): tiny random Hugging Face folders with real
safetensors shards, and byte-level tampering."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import safetensors.numpy

from open_autoglm.registry import Registry

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
NUM_LAYERS = 100  # 100 equal tensors: changing one is 1% of the bytes


def random_tensors(seed: int = 0, num_layers: int = NUM_LAYERS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {
        f"model.layers.{i}.mlp.weight": rng.standard_normal((64, 256), dtype=np.float32)
        for i in range(num_layers)
    }
    tensors["model.norm.weight"] = rng.standard_normal(64).astype(np.float16)  # small, another dtype
    tensors["model.empty"] = np.zeros((0,), np.float32)  # zero bytes
    return tensors


def write_model(
    folder: Path, tensors: dict[str, np.ndarray], sharded: bool = False, template: str = TEMPLATE
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})
    )
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "</s>"})
    )
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    if not sharded:
        safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fn, part in shards.items():
        safetensors.numpy.save_file(
            {n: tensors[n] for n in part}, str(folder / fn), metadata={"format": "pt"}
        )
    weight_map = {n: fn for fn, part in shards.items() for n in part}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def fine_tune(tensors: dict[str, np.ndarray], names: list[str], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        n: (t + rng.standard_normal(t.shape).astype(t.dtype) if n in names else t) for n, t in tensors.items()
    }


def flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def staged(reg: Registry, name: str) -> list[Path]:
    staging = reg.root / name / ".staging"
    return list(staging.iterdir()) if staging.is_dir() else []
