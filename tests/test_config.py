"""YAML config file and engine options: spec keys mapped, bad keys and values named."""

from __future__ import annotations

import pytest

from open_autoglm.config import EngineConfig, load_config_file, options_for_level
from open_autoglm.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_spec_keys_map_onto_engine_options(tmp_path):
    cfg = load_config_file(write(tmp_path, """
model: /models/x
backend: torch
max_batch_size: 8
dynamic_shape:
  input_ids: [1, 128, 512]
enable_cache: false
block_size: 32
"""))
    assert cfg.model == "/models/x"
    assert cfg.attention_backend == "torch"
    assert cfg.max_num_seqs == 8
    assert cfg.max_model_len == 512 and cfg.max_num_batched_tokens == 512
    assert cfg.enable_prefix_caching is False
    assert cfg.block_size == 32


def test_overrides_beat_the_file(tmp_path):
    cfg = load_config_file(write(tmp_path, "max_batch_size: 8\n"), max_num_seqs=3)
    assert cfg.max_num_seqs == 3


@pytest.mark.parametrize("text, key, fragment", [
    ("backend: tensorrt\n", "backend", "available backends: autoglm, auto, torch, triton"),
    ("colour: blue\n", "colour", "known options"),
    ("max_batch_size: 0\n", "max_num_seqs", "positive integer"),
    ("enable_cache: maybe\n", "enable_cache", "true or false"),
    ("dynamic_shape: {input_ids: [512, 128, 1]}\n", "dynamic_shape.input_ids", "min <= opt <= max"),
    ("dynamic_shape: {pixels: [1, 2, 3]}\n", "dynamic_shape", "input_ids"),
    ("dtype: float8\n", "dtype", "allowed: auto, bfloat16, float16, float32"),
    ("- a list\n", "config", "mapping"),
    ("a: [unclosed\n", "config", "not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path, text, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config_file(write(tmp_path, text))
    assert err.value.key == key
    assert fragment in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config_file(tmp_path / "nope.yaml")


def test_unknown_engine_option():
    with pytest.raises(ConfigError, match="bogus: unknown option"):
        EngineConfig.from_options(bogus=1)


def test_optimize_levels():
    assert options_for_level(0)["enable_prefix_caching"] is False
    assert options_for_level(3)["compile"] is True
    with pytest.raises(ConfigError, match="optimize_level"):
        options_for_level(7)
