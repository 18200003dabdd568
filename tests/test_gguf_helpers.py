"""Shared by the test_gguf* modules (no tests here): tiny random transformers models written as GGUF
the way llama.cpp's converter does (names, q/k row permutation, tokenizer metadata, quantization)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from conftest import CHAT_TEMPLATE, make_tokenizer

QType = gguf.GGMLQuantizationType
PROMPT = [[5, 17, 42, 99, 7, 250, 3, 64, 12, 200]]


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF (rotate_half) rows -> GGUF (interleaved) rows."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(shape: tuple[int, int], qtype: QType, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant bytes with a small finite f16 scale (gguf-py cannot quantize K types)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block_size * type_size), dtype=np.uint8)
    scale = np.full((raw.size // type_size, 1), 0.01, dtype=np.float16).view(np.uint8)  # [blocks, 2]
    blocks = raw.reshape(-1, type_size)
    if qtype == QType.Q6_K:
        blocks[:, -2:] = scale  # layout: ql, qh, scales, d
    else:
        blocks[:, 0:2], blocks[:, 2:4] = scale, scale  # Q4_K layout: d, dmin, scales, qs
    return raw


def write_gguf(
    path: Path,
    model,
    tokenizer_dir: Path,
    qtype: QType = QType.F32,
    overrides: dict[str, QType | np.ndarray] | None = None,
    extra_tensors=(),
) -> dict[str, np.ndarray]:
    """A mini convert_hf_to_gguf: metadata, tokenizer and tensors. Returns what was stored per GGUF name
    (2-D weights in `qtype`, norms F32; `overrides` by GGUF name: a type, or raw bytes of a K type)."""
    cfg, arch = model.config, model.config.model_type
    overrides = overrides or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    id_to_token = {i: t for t, i in tok["model"]["vocab"].items()}
    specials = {t["id"] for t in tok["added_tokens"] if t["special"]}
    id_to_token |= {t["id"]: t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([id_to_token[i] for i in range(len(id_to_token))])
    w.add_token_types([3 if i in specials else 1 for i in range(len(id_to_token))])
    w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    stored, rng = {}, np.random.default_rng(0)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = tensor.float().numpy()
        if arch == "llama" and ".attn_q." in name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        t = overrides.get(name, qtype if data.ndim == 2 else QType.F32)
        if t in (QType.Q4_K, QType.Q6_K):
            raw = random_k_blocks(data.shape, t, rng)
            w.add_tensor(name, raw, raw_dtype=t)
            stored[name] = gguf.quants.dequantize(raw, t)
        elif isinstance(t, np.dtype):  # an unusual storage type (F64...)
            w.add_tensor(name, data.astype(t))
        elif t in (QType.F32, QType.F16):
            w.add_tensor(name, gguf.quants.quantize(data, t))
            stored[name] = gguf.quants.quantize(data, t).astype(np.float32)
        else:
            raw = gguf.quants.quantize(data, t)
            w.add_tensor(name, raw, raw_dtype=t)
            stored[name] = gguf.quants.dequantize(raw, t)
    for name, data in extra_tensors:
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def tiny_models(tmp_path_factory):
    """tokenizer folder and tiny random models: llama (untied, rope_theta 1e5) and qwen2 (tied, q/k/v biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok_dir = tmp_path_factory.mktemp("tok")
    tokenizer = make_tokenizer(tok_dir)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=1e5,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    models = {}
    for arch, cfg, cls in [
        ("llama", LlamaConfig(**common), LlamaForCausalLM),
        ("qwen2", Qwen2Config(**common, tie_word_embeddings=True), Qwen2ForCausalLM),
    ]:
        torch.manual_seed(0)
        model = cls(cfg).eval()
        with torch.no_grad():  # norms are ones at init; make them matter
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn_like(p))
        models[arch] = model
    return tok_dir, tokenizer, models


def logits(model_or_dir, ids=PROMPT) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = model_or_dir
    if isinstance(model_or_dir, Path):
        model = AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def written_gguf(path, model, tok_dir, **kwargs) -> Path:
    write_gguf(path, model, tok_dir, **kwargs)
    return path
