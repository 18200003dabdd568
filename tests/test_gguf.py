"""GGUF reading: tiny random transformers models written as GGUF the way llama.cpp's converter does
(names, q/k row permutation, tokenizer metadata, quantization), then read back and compared."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import CHAT_TEMPLATE, CORPUS, make_tokenizer
from safetensors import safe_open

from open_autoglm.errors import ModelLoadError
from open_autoglm.models.gguf_loader import gguf_to_hf_folder, iter_gguf_tensors, read_gguf

QType = gguf.GGMLQuantizationType
QUANTIZABLE = [QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1]
# Largest error allowed, as a fraction of the tensor's largest magnitude.
TOLERANCE = {
    QType.F16: 1e-3,
    QType.BF16: 1e-2,
    QType.Q8_0: 1e-2,
    QType.Q5_0: 0.1,
    QType.Q5_1: 0.1,
    QType.Q4_0: 0.2,
    QType.Q4_1: 0.2,
}
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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
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


def test_iter_tensors_names_shapes_values(tiny, tmp_path):
    tok_dir, _, models = tiny
    write_gguf(tmp_path / "m.gguf", models["llama"], tok_dir)
    expected = models["llama"].state_dict()
    got = dict(iter_gguf_tensors(tmp_path / "m.gguf"))
    assert list(got) and set(got) == set(expected)
    assert "model.layers.1.self_attn.q_proj.weight" in got and "lm_head.weight" in got
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32 and tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]), name
    tied = dict(iter_gguf_tensors(_write(tmp_path / "q.gguf", models["qwen2"], tok_dir)))
    assert "lm_head.weight" not in tied and "model.layers.0.self_attn.k_proj.bias" in tied


def _write(path, model, tok_dir, **kwargs) -> Path:
    write_gguf(path, model, tok_dir, **kwargs)
    return path


def test_read_gguf_config_generation_and_tokenizer(tiny, tmp_path):
    tok_dir, tokenizer, models = tiny
    cfg = models["llama"].config
    m = read_gguf(_write(tmp_path / "m.gguf", models["llama"], tok_dir))
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
    path = _write(tmp_path / "m.gguf", models_["llama"], tok_dir)
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "DECOY"}))
    m = read_gguf(path)
    assert len(m.tokenizer) == len(tokenizer) and m.tokenizer.chat_template == CHAT_TEMPLATE
    assert m.tokenizer(CORPUS[0]).input_ids == tokenizer(CORPUS[0]).input_ids


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantized_types_match_originals(tiny, tmp_path, qtype):
    tok_dir, _, models = tiny
    model = models["llama"]
    stored = write_gguf(tmp_path / "m.gguf", model, tok_dir, qtype=qtype)
    expected = model.state_dict()
    inverse = {v: k for k, v in _name_pairs(model).items()}
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    for name, tensor in iter_gguf_tensors(tmp_path / "m.gguf"):
        original = expected[name]
        bound = TOLERANCE[qtype] * original.abs().max().item() if original.ndim == 2 else 0.0
        assert (tensor - original).abs().max().item() <= bound, name
        # Bit-exact against gguf's own round trip, un-permuted by the test's independent inverse.
        gguf_name = inverse[name]
        exact = stored[gguf_name].reshape(original.shape)
        if (part := gguf_name.split(".")[2] if gguf_name.startswith("blk.") else "") in heads:
            exact = _unpermute(exact, heads[part])
        assert torch.equal(tensor, torch.from_numpy(np.ascontiguousarray(exact))), name


def _name_pairs(model) -> dict[str, str]:
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    return {name_map.get_name(k, try_suffixes=(".weight", ".bias")): k for k in model.state_dict()}


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama_cpp_permute, by index gathering (independent of the loader's reshape)."""
    head_dim = w.shape[0] // num_heads
    order = np.arange(w.shape[0]).reshape(num_heads, head_dim)
    hf_from_gguf = np.concatenate([order[:, 0::2], order[:, 1::2]], axis=1).reshape(-1)  # [H*D]
    return w[hf_from_gguf]


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q6_K], ids=lambda t: t.name)
def test_k_quants_dequantize(tiny, tmp_path, qtype):
    tok_dir, _, models = tiny
    stored = write_gguf(
        tmp_path / "m.gguf", models["llama"], tok_dir, overrides={"blk.0.ffn_down.weight": qtype}
    )
    got = dict(iter_gguf_tensors(tmp_path / "m.gguf"))["model.layers.0.mlp.down_proj.weight"]
    assert got.shape == (64, 256)
    assert torch.equal(got, torch.from_numpy(stored["blk.0.ffn_down.weight"]).reshape(64, 256))


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


def test_unsupported_tensor_type_names_tensor_and_type(tiny, tmp_path):
    tok_dir, _, models = tiny
    path = _write(
        tmp_path / "m.gguf", models["llama"], tok_dir, overrides={"blk.1.ffn_up.weight": np.dtype("float64")}
    )
    with pytest.raises(ModelLoadError, match=r"blk\.1\.ffn_up\.weight.*F64"):
        gguf_to_hf_folder(path, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_unknown_tensor_and_rope_scaling_rejected(tiny, tmp_path):
    tok_dir, _, models = tiny
    path = _write(
        tmp_path / "a.gguf",
        models["llama"],
        tok_dir,
        extra_tensors=[("blk.0.mystery.weight", np.zeros(4, np.float32))],
    )
    with pytest.raises(ModelLoadError, match=r"a\.gguf.*blk\.0\.mystery\.weight"):
        list(iter_gguf_tensors(path))
    path = _write(
        tmp_path / "b.gguf",
        models["llama"],
        tok_dir,
        extra_tensors=[("rope_freqs.weight", np.ones(8, np.float32))],
    )
    with pytest.raises(ModelLoadError, match=r"b\.gguf.*rope"):
        read_gguf(path)


def _cut(data: bytes) -> dict[str, bytes]:
    return {
        "empty": b"",
        "bad_magic": b"GGUX" + data[4:],
        "cut_in_header": data[:100],
        "cut_in_metadata": data[: len(data) // 8],
        "cut_in_tensor_data": data[:-1000],
    }


@pytest.mark.parametrize("kind", list(_cut(b"")))
def test_corrupt_file_raises_and_writes_nothing(tiny, tmp_path, kind):
    tok_dir, _, models = tiny
    good = _write(tmp_path / "good.gguf", models["llama"], tok_dir).read_bytes()
    bad = tmp_path / "work" / "bad.gguf"
    bad.parent.mkdir()
    bad.write_bytes(_cut(good)[kind])
    for call in (
        lambda: gguf_to_hf_folder(bad, tmp_path / "work" / "hf", progress=False),
        lambda: read_gguf(bad),
        lambda: iter_gguf_tensors(bad),
    ):
        with pytest.raises(ModelLoadError, match="bad.gguf"):
            call()
    assert [p.name for p in bad.parent.iterdir()] == ["bad.gguf"]


def test_missing_file_and_existing_output(tiny, tmp_path):
    tok_dir, _, models = tiny
    with pytest.raises(ModelLoadError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")
    path = _write(tmp_path / "m.gguf", models["llama"], tok_dir)
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError):
        gguf_to_hf_folder(path, tmp_path / "hf", progress=False)
