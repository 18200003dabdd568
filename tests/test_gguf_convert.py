"""GGUF to Hugging Face: conversion to a folder (same logits, exact storage dtype), and the config,
generation config and tokenizer read from GGUF metadata."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CHAT_TEMPLATE, CORPUS
from safetensors import safe_open
from test_gguf_helpers import QType, logits, tiny_models, write_gguf, written_gguf

from open_autoglm.models.gguf_loader import gguf_to_hf_folder, iter_gguf_tensors, read_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tokenizer folder and tiny random models: llama (untied, rope_theta 1e5) and qwen2 (tied, q/k/v biases)."""
    return tiny_models(tmp_path_factory)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_gguf_converts_to_same_logits(tiny, tmp_path, arch):
    """Exact logits prove the names, shapes, q/k un-permutation (llama) and config are right."""
    tok_dir, tokenizer, models = tiny
    write_gguf(tmp_path / "m.gguf", models[arch], tok_dir)
    out = gguf_to_hf_folder(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    assert out == tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    torch.testing.assert_close(logits(out), logits(models[arch]), atol=1e-5, rtol=0)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(out)
    assert len(reloaded) == len(tokenizer) and reloaded.chat_template == CHAT_TEMPLATE
    assert reloaded(CORPUS[4]).input_ids == tokenizer(CORPUS[4]).input_ids
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is (arch == "qwen2")
    assert (
        config["rope_theta"] == 1e5 and config["rms_norm_eps"] == 1e-5 and config["torch_dtype"] == "float32"
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_read_gguf_config_generation_and_tokenizer(tiny, tmp_path):
    tok_dir, tokenizer, models = tiny
    cfg = models["llama"].config
    m = read_gguf(written_gguf(tmp_path / "m.gguf", models["llama"], tok_dir))
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "head_dim",
        "rms_norm_eps",
    ):
        assert m.config[key] == getattr(cfg, key), key
    assert m.config["architectures"] == ["LlamaForCausalLM"] and m.config["tie_word_embeddings"] is False
    assert (m.config["bos_token_id"], m.config["eos_token_id"]) == (0, 1)
    assert m.generation_config == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    for text in CORPUS[:6]:
        assert m.tokenizer(text).input_ids == tokenizer(text).input_ids, text
    assert m.tokenizer.decode(tokenizer(CORPUS[4]).input_ids) == CORPUS[4]
    messages = [{"role": "user", "content": "hi"}]
    assert m.tokenizer.chat_template == CHAT_TEMPLATE
    assert m.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|user|>hi<|end|><|assistant|>"
    )


def test_tokenizer_comes_from_the_gguf_not_its_neighbours(tiny, tmp_path):
    """transformers would prefer a tokenizer.json lying next to the GGUF; we must not."""
    from tokenizers import Tokenizer, models

    tok_dir, tokenizer, models_ = tiny
    path = written_gguf(tmp_path / "m.gguf", models_["llama"], tok_dir)
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "DECOY"}))
    m = read_gguf(path)
    assert len(m.tokenizer) == len(tokenizer) and m.tokenizer.chat_template == CHAT_TEMPLATE
    assert m.tokenizer(CORPUS[0]).input_ids == tokenizer(CORPUS[0]).input_ids


@pytest.mark.parametrize(
    ("qtype", "dtype"),
    [(QType.F16, "F16"), (QType.BF16, "BF16"), (QType.Q4_1, "F32")],
    ids=["F16", "BF16", "Q4_1"],
)
def test_storage_dtype_is_exact(tiny, tmp_path, qtype, dtype):
    """16-bit sources are stored 16-bit (norms fit exactly after a round trip); quantized ones float32."""
    tok_dir, _, models = tiny
    model = models["llama"]
    with torch.no_grad():  # llama.cpp keeps norms F32; make them exact in 16 bits, as real ones are
        cast = torch.float16 if qtype == QType.F16 else torch.bfloat16
        norms = {n: p.clone() for n, p in model.named_parameters() if "norm" in n}
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(p.to(cast).float())
    try:
        write_gguf(tmp_path / "m.gguf", model, tok_dir, qtype=qtype)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in norms:
                    p.copy_(norms[n])
    out = gguf_to_hf_folder(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    with safe_open(out / "model.safetensors", "pt") as f:
        for name, tensor in iter_gguf_tensors(tmp_path / "m.gguf"):
            assert f.get_slice(name).get_dtype() == dtype
            assert torch.equal(f.get_tensor(name).float(), tensor), name
    assert (
        json.loads((out / "config.json").read_text())["torch_dtype"]
        == {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[dtype]
    )
