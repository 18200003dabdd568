"""The real default model, SmolLM2-135M-Instruct (pulled once from PyPI into the model cache)."""

from __future__ import annotations

import pytest
from conftest import hf_greedy

from open_autoglm.llm import LLM
from open_autoglm.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time,",
    "The three primary colors are",
    "Water boils at",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "In 1969, humans",
    "Machine learning is",
]


@pytest.fixture(scope="module")
def smollm2_dir():
    from open_autoglm.models.catalog import pull

    return pull("smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(model=str(smollm2_dir))


def test_greedy_matches_transformers(llm, smollm2_dir):
    prompt_ids = [llm.engine.tokenize(p) for p in PROMPTS]
    expected = hf_greedy(smollm2_dir, prompt_ids, 32)
    outputs = llm.generate(prompt_ids, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert [o.output_token_ids for o in outputs] == expected


def test_capital_of_france(llm):
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))[0]
    assert "Paris" in out.text


def test_chat_template_answers(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=24, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")


def test_gguf_and_converted_folder_give_identical_tokens(llm, smollm2_dir):
    gguf_files = sorted(smollm2_dir.glob("*.gguf")) or sorted(smollm2_dir.parent.glob("**/*.gguf"))
    assert gguf_files, f"no .gguf kept beside {smollm2_dir}"
    from_gguf = LLM(model=str(gguf_files[0]))
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    a = [o.output_token_ids for o in llm.generate(PROMPTS[:4], params)]
    b = [o.output_token_ids for o in from_gguf.generate(PROMPTS[:4], params)]
    assert a == b
