"""The gpt-fast-style peer (bench/peers.py): its static-cache loop must produce transformers' own greedy
tokens, uncompiled, compiled (inductor on CPU) and, on a GPU, compiled with CUDA graphs."""

from __future__ import annotations

import functools
import shutil

import pytest
import torch
from conftest import hf_greedy

from open_autoglm.bench.peers import gpt_fast_decode, gpt_fast_run

PROMPT = [5, 17, 42, 99, 3, 8, 120, 64, 7]
OUTPUT_LEN = 12


def _load(tiny_checkpoint, arch: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch), dtype=torch.float32).to(device).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_uncompiled_loop_matches_generate(tiny_checkpoint, arch):
    model = _load(tiny_checkpoint, arch)
    run = gpt_fast_run(model, PROMPT, OUTPUT_LEN, compile=False)
    assert run.token_ids == hf_greedy(tiny_checkpoint(arch), [PROMPT], OUTPUT_LEN)[0]
    assert run.decode_tok_s > 0 and run.warmup_s > 0


def test_decode_keeps_its_two_number_contract(tiny_checkpoint):
    rate, warm = gpt_fast_decode(_load(tiny_checkpoint, "qwen2"), PROMPT, 4, compile=False)
    assert rate > 0 and warm > 0


def test_fullgraph_capture_matches_eager(tiny_checkpoint, monkeypatch):
    """Dynamo captures decode_one_token whole (static-cache mutation included) and the graph gives the
    eager tokens; aot_eager skips inductor's C++ compile, so this runs in seconds."""
    model = _load(tiny_checkpoint, "qwen2")
    expected = gpt_fast_run(model, PROMPT, OUTPUT_LEN, compile=False).token_ids
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    with torch._dynamo.config.patch(error_on_recompile=True):
        run = gpt_fast_run(model, PROMPT, OUTPUT_LEN, compile=True, mode=None)
    assert run.token_ids == expected


@pytest.mark.slow
def test_inductor_compiled_loop_matches_eager(tiny_checkpoint):
    """The real compile (inductor, default mode) on CPU: ~40 s cold on 2 cores, seconds with a warm cache."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: inductor cannot compile on this CPU")
    model = _load(tiny_checkpoint, "llama")
    expected = gpt_fast_run(model, PROMPT, OUTPUT_LEN, compile=False).token_ids
    torch._dynamo.reset()
    try:
        run = gpt_fast_run(model, PROMPT, OUTPUT_LEN, compile=True, mode=None)
    except Exception as e:  # noqa: BLE001 - a toolchain that cannot build kernels is not our bug
        if "CppCompileError" in f"{type(e).__name__} {e}":
            pytest.skip(f"inductor cannot build C++ kernels here: {str(e)[:200]}")
        raise
    assert run.token_ids == expected


@pytest.mark.gpu
def test_cuda_graph_loop_matches_eager(tiny_checkpoint):
    """The peer as the latency bench runs it: reduce-overhead (CUDA graphs), replays after recording."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = _load(tiny_checkpoint, "qwen2", "cuda")
    expected = gpt_fast_run(model, PROMPT, 24, compile=False).token_ids
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run = gpt_fast_run(model, PROMPT, 24, compile=True)
    assert run.token_ids == expected
    assert counters["inductor"]["cudagraph_skips"] == 0  # a silent fallback would time eager kernels
