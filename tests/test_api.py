"""Python API (LLM, AutoGLM, AutoGLMEngine, AsyncEngine) and the CLI, on a tiny model."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from open_autoglm import AsyncEngine, AutoGLM, AutoGLMEngine, EngineConfig
from open_autoglm.llm import LLM
from open_autoglm.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_checkpoint):
    return str(tiny_checkpoint("qwen2"))


@pytest.fixture(scope="module")
def llm(path):
    return LLM(model=path)


def test_stream_deltas_add_up_to_generate(llm):
    full = llm.generate(["Paged attention"], GREEDY)[0]
    deltas = list(llm.stream("Paged attention", GREEDY))
    assert "".join(d.new_text for d in deltas) == full.text
    assert sum((d.new_token_ids for d in deltas), []) == full.output_token_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert all(not d.finished for d in deltas[:-1])


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    a = llm.generate(["Once upon", "The quick"], params)
    b = llm.generate(["Once upon"], params)
    assert a[0].output_token_ids == b[0].output_token_ids


def test_stop_string_and_stop_token(llm):
    full = llm.generate(["The quick"], GREEDY)[0]
    stop_text = full.text[3:6]
    out = llm.generate(["The quick"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop_text]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_text
    assert out.text == full.text[: full.text.index(stop_text)]
    token = full.output_token_ids[4]
    out = llm.generate(["The quick"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                     stop_token_ids=[token]))[0]
    assert out.finish_reason == "stop" and out.output_token_ids[-1] == token


def test_logprobs_are_returned(llm):
    out = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, logprobs=2, ignore_eos=True))[0]
    # generate() returns final outputs only: its "new" part is the whole output (stream() gives steps)
    assert len(out.new_logprobs) == 3 and len(out.output_logprobs) == 3
    entry = out.output_logprobs[-1]
    assert entry["token_id"] == out.output_token_ids[-1] and len(entry["top"]) == 2
    assert entry["top"][0][0] == entry["token_id"]  # greedy picks the most likely


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "hi"}]
    out = llm.chat(messages, GREEDY)[0]
    expected_prompt = llm.tokenizer.encode("<|user|>hi<|end|><|assistant|>", add_special_tokens=False)
    assert out.prompt_token_ids == expected_prompt


def test_autoglm_returns_text(path, llm):
    text = AutoGLM(model_path=path, device="cpu").generate("Paged attention", max_tokens=12, temperature=0,
                                                           ignore_eos=True)
    assert text == llm.generate(["Paged attention"], GREEDY)[0].text


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_autoglm_engine_every_optimize_level_runs(path, llm, level):
    engine = AutoGLMEngine(model_path=path, device="cpu", optimize_level=level)
    text = engine.generate(prompt="Paged attention", max_tokens=12, temperature=0, ignore_eos=True)
    assert text == llm.generate(["Paged attention"], GREEDY)[0].text


def test_alias_package():
    from openautoglm import AutoGLMEngine as Alias

    assert Alias is AutoGLMEngine


def test_async_engine_streams_and_aborts(path, llm):
    engine = AsyncEngine(EngineConfig(model=path))

    async def main():
        texts = []
        async for out in engine.generate("Paged attention", GREEDY):
            texts.append(out.new_text)
        gen = engine.generate("The quick", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()  # the client went away
        await asyncio.sleep(0.2)
        stats = await engine.call(lambda e: e.stats())
        return "".join(texts), stats

    try:
        text, stats = asyncio.run(main())
    finally:
        engine.shutdown()
    assert text == llm.generate(["Paged attention"], GREEDY)[0].text
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]


def test_cli_generate(path):
    result = subprocess.run(
        [sys.executable, "-m", "open_autoglm.cli", "generate", "Paged attention", "--model", path,
         "--temperature", "0", "--max-tokens", "12", "--ignore-eos"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != ""


def test_cli_reports_bad_input_without_traceback(path):
    result = subprocess.run(
        [sys.executable, "-m", "open_autoglm.cli", "generate", "x", "--model", path, "--top-p", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "top_p" in result.stderr and "Traceback" not in result.stderr


def test_cli_chat_two_turns(path):
    result = subprocess.run(
        [sys.executable, "-m", "open_autoglm.cli", "chat", "--model", path, "--temperature", "0",
         "--max-tokens", "4"],
        input="hello there\nand again\n/exit\n", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(">>> ") == 3  # two answered turns, then /exit
