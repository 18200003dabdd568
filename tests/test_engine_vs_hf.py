"""Greedy outputs token-identical to transformers, for every architecture and engine mode."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import hf_greedy

from open_autoglm.llm import LLM
from open_autoglm.sampling_params import SamplingParams

ARCHS = ["llama", "llama3-tied", "qwen2", "glm4"]
MODES = {
    "prefix-cache": dict(),
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(num_kv_blocks=12),  # 8 prompts of up to 84 tokens cannot all fit in 12 x 16
}
NEW_TOKENS = 24


def mixed_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(6, 300) for _ in range(rng.randrange(3, 60))] for _ in range(8)]
    prompts.append(prompts[0][:5] + prompts[1])  # shares nothing useful: a miss
    prompts.append(prompts[1][:40] + [7, 8, 9])  # shares a 2-block prefix with prompt 1: a hit
    return prompts


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = hf_greedy(tiny_checkpoint(arch), mixed_prompts(), NEW_TOKENS)
        return cache[arch]

    return get


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(arch, mode, tiny_checkpoint, references):
    llm = LLM(model=str(tiny_checkpoint(arch)), **MODES[mode])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outputs = llm.generate(mixed_prompts(), params)
    assert [o.output_token_ids for o in outputs] == references(arch)
    stats = llm.engine.stats()
    if mode == "preemption":
        assert stats["num_preemptions"] > 0
    if mode == "prefix-cache":
        # The same prompts again: now served from cached blocks, with the same tokens.
        again = llm.generate(mixed_prompts(), params)
        assert [o.output_token_ids for o in again] == references(arch)
        assert llm.engine.stats()["prefix_cache_hits"] > 0
        assert all(o.num_cached_tokens > 0 for o, p in zip(again, mixed_prompts()) if len(p) > 16)
    if mode == "no-prefix-cache":
        assert stats["prefix_cache_hits"] == 0
    assert stats["num_free_blocks"] == stats["num_blocks"]  # every block returned


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_logits_match_transformers(arch, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(model=str(path), max_num_batched_tokens=16)  # chunked: logits of a later chunk see cached KV
    prompt = mixed_prompts()[2]
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0, -1]
    engine = llm.engine
    captured = {}
    original = engine.sampler.__class__.__call__

    def spy(self, logits, requests):
        captured["logits"] = logits.clone()
        return original(self, logits, requests)

    engine.sampler.__class__.__call__ = spy
    try:
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    finally:
        engine.sampler.__class__.__call__ = original
    torch.testing.assert_close(captured["logits"][0], expected, atol=1e-4, rtol=0)
