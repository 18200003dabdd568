"""Peers run on the same workload in the same invocation: transformers' continuous batching
(`generate_batch`) and a gpt-fast-style loop (static KV cache + torch.compile reduce-overhead)."""

from __future__ import annotations

import time


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


def gpt_fast_decode(model, prompt: list[int], output_len: int) -> tuple[float, float]:
    """Batch-1 greedy decode with a static cache and a compiled (CUDA-graph) forward.
    Returns (decode tokens/s, compile + warm-up seconds)."""
    import torch
    from transformers import GenerationConfig

    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    gen = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                           eos_token_id=None, pad_token_id=0, cache_implementation="static")
    ids = torch.tensor([prompt], device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(2):  # compile, then settle the graphs
            model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        warm = time.perf_counter() - t0
        short = GenerationConfig(**{**gen.to_dict(), "max_new_tokens": 2, "min_new_tokens": 2})
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=short)
        torch.cuda.synchronize()
        t_prefill = time.perf_counter() - t1
        t2 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        torch.cuda.synchronize()
        total = time.perf_counter() - t2
    # Subtract the prefill + first step measured alone so the rate is decode only.
    return (output_len - 2) / max(total - t_prefill, 1e-9), warm
