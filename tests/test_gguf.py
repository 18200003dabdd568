"""GGUF reading: names, shapes and dequantized values of every tensor (F16/BF16, legacy and K quants),
and clear errors for unsupported, unknown or corrupt input."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from test_gguf_helpers import QType, tiny_models, write_gguf, written_gguf

from open_autoglm.errors import ModelLoadError
from open_autoglm.models.gguf_loader import gguf_to_hf_folder, iter_gguf_tensors, read_gguf

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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tokenizer folder and tiny random models: llama (untied, rope_theta 1e5) and qwen2 (tied, q/k/v biases)."""
    return tiny_models(tmp_path_factory)


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
    tied = dict(iter_gguf_tensors(written_gguf(tmp_path / "q.gguf", models["qwen2"], tok_dir)))
    assert "lm_head.weight" not in tied and "model.layers.0.self_attn.k_proj.bias" in tied


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


def test_unsupported_tensor_type_names_tensor_and_type(tiny, tmp_path):
    tok_dir, _, models = tiny
    path = written_gguf(
        tmp_path / "m.gguf", models["llama"], tok_dir, overrides={"blk.1.ffn_up.weight": np.dtype("float64")}
    )
    with pytest.raises(ModelLoadError, match=r"blk\.1\.ffn_up\.weight.*F64"):
        gguf_to_hf_folder(path, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_unknown_tensor_and_rope_scaling_rejected(tiny, tmp_path):
    tok_dir, _, models = tiny
    path = written_gguf(
        tmp_path / "a.gguf",
        models["llama"],
        tok_dir,
        extra_tensors=[("blk.0.mystery.weight", np.zeros(4, np.float32))],
    )
    with pytest.raises(ModelLoadError, match=r"a\.gguf.*blk\.0\.mystery\.weight"):
        list(iter_gguf_tensors(path))
    path = written_gguf(
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
    good = written_gguf(tmp_path / "good.gguf", models["llama"], tok_dir).read_bytes()
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
    path = written_gguf(tmp_path / "m.gguf", models["llama"], tok_dir)
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError):
        gguf_to_hf_folder(path, tmp_path / "hf", progress=False)
