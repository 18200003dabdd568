"""Peers run on the same workload in the same invocation: transformers' continuous batching
(`generate_batch`) and a gpt-fast-style loop (static KV cache + torch.compile reduce-overhead)."""

from __future__ import annotations

import time
from dataclasses import dataclass


def load_hf_model(model_path: str, dtype, device: str, random_weights: bool, attn: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_weights:
        config = AutoConfig.from_pretrained(model_path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn).to(device)
    return model.eval()


def hf_generate_batch(model, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    """(seconds, output tokens) of transformers' continuous batching on `prompts`."""
    from transformers import GenerationConfig

    def config(n):  # no eos_token_id: exactly n tokens per request
        return GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    # No inference_mode: generate_batch resets its static tensors in place on its own thread.
    model.generate_batch(inputs=prompts[:2], generation_config=config(4))
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=config(output_len))
    seconds = time.perf_counter() - start
    return seconds, sum(len(r.generated_tokens) for r in results.values())


@dataclass(frozen=True)
class GptFastRun:
    """One gpt-fast-style run: `token_ids` are the `output_len` greedy tokens after the prompt (the first
    comes from the prefill); `decode_tok_s` counts the other output_len - 1 over the decode loop alone."""

    token_ids: list[int]
    decode_tok_s: float
    warmup_s: float


def gpt_fast_decode(model, prompt: list[int], output_len: int, compile: bool = True,
                    mode: str | None = "reduce-overhead") -> tuple[float, float]:
    """Batch-1 greedy decode with a static cache and a compiled (CUDA-graph) decode step.
    Returns (decode tokens/s excluding prefill, compile + warm-up seconds)."""
    run = gpt_fast_run(model, prompt, output_len, compile, mode)
    return run.decode_tok_s, run.warmup_s


def gpt_fast_run(model, prompt: list[int], output_len: int, compile: bool = True,
                 mode: str | None = "reduce-overhead") -> GptFastRun:
    """gpt-fast's loop on a transformers model: StaticCache, eager prefill, then one compiled
    `decode_one_token` per step (mode="reduce-overhead": CUDA graphs; None: inductor's default).

    The prefill stays eager so the cache allocates its tensors (and marks their addresses static)
    outside any graph. (The old peer compiled model.forward under generate(): the prefill then ran
    compiled, the cache was allocated inside a CUDA graph, and the next replay overwrote it.) One warm-up pass compiles and records the graphs, then a second pass on the
    same cache (reset in place: graphs keep their addresses) is timed."""
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=len(prompt) + output_len)

    def decode_one_token(token_ids, position_ids):  # [1, 1] each -> next token [1, 1]
        logits = model(input_ids=token_ids, position_ids=position_ids, past_key_values=cache, use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    if compile:
        decode_one_token = torch.compile(decode_one_token, mode=mode, fullgraph=True)
    t0 = time.perf_counter()
    _greedy_loop(model, cache, prompt, output_len, decode_one_token)  # compile, record, settle
    warmup_s = time.perf_counter() - t0
    cache.reset()
    token_ids, decode_s = _greedy_loop(model, cache, prompt, output_len, decode_one_token)
    return GptFastRun(token_ids, (output_len - 1) / max(decode_s, 1e-9), warmup_s)


def _greedy_loop(model, cache, prompt: list[int], output_len: int, decode_one_token) -> tuple[list[int], float]:
    """(output_len greedy tokens, seconds of the decode loop after the prefill) on an empty `cache`."""
    import torch

    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        ids = torch.tensor([prompt], device=device)  # [1, P]
        positions = torch.arange(len(prompt), device=device)[None]  # [1, P]
        logits = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits  # eager prefill
        token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        position = torch.tensor([[len(prompt)]], device=device)  # [1, 1]
        out = [token]
        sync()
        start = time.perf_counter()
        for _ in range(output_len - 1):
            # A CUDA-graph replay reuses its output buffers: mark each step, and clone what is kept.
            torch.compiler.cudagraph_mark_step_begin()
            token = decode_one_token(token, position).clone()
            out.append(token)
            position += 1
    sync()
    seconds = time.perf_counter() - start
    return torch.cat(out, dim=1)[0].tolist(), seconds
