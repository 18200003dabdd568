"""Loading: sharded checkpoints, dtypes, EOS ids from generation_config.json."""

from __future__ import annotations

import json

import pytest
import torch

from open_autoglm.llm import LLM
from open_autoglm.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def test_sharded_checkpoint_loads_like_a_single_file(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_checkpoint("qwen2")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(src).save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").exists()
    a = LLM(model=str(src)).generate(["The quick brown"], GREEDY)[0].output_token_ids
    b = LLM(model=str(sharded)).generate(["The quick brown"], GREEDY)[0].output_token_ids
    assert a == b


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_option(tiny_checkpoint, dtype):
    llm = LLM(model=str(tiny_checkpoint("llama")), dtype=dtype)
    assert {p.dtype for p in llm.engine.model.parameters()} == {getattr(torch, dtype)}
    assert llm.engine.runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    assert len(llm.generate(["hello"], GREEDY)[0].output_token_ids) == 10


def test_eos_ids_come_from_generation_config(tiny_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "eos"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    llm = LLM(model=str(folder))
    assert llm.engine.eos_token_ids == (1, 5)
