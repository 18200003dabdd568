"""Check the gpt-fast-style peer on a GPU before the latency bench relies on it.

    PYTHONPATH=. python benchmarks/gptfast_gpu_check.py

Qwen2.5-1.5B's shape with random bf16 weights (nothing to download), loaded the way
`autoglm bench latency --peer gptfast` loads it; a 512-token random prompt, 256 output tokens through
`gpt_fast_run` (static cache, decode step compiled with mode="reduce-overhead": CUDA graphs). Its first
32 tokens are compared with the same loop uncompiled. Prints one line (graphs: dynamo graphs compiled,
1 unless it recompiled; cudagraph_skips: inductor fell back to no CUDA graphs, 0 expected):

    gptfast tok/s=... warm_s=... tokens_match=True|False ...

Random weights give flat logits, so bf16 rounding that differs between inductor's fused kernels and
eager can flip a near-tie; on a mismatch the line also gives, at the first differing step, the gap
between the eager top-2 logits (near_tie=True: a rounding flip, not a broken cache).
Exits 1 with the exception printed on any failure, including a 230 s deadline.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
import traceback

INPUT_LEN, OUTPUT_LEN, CHECK_LEN, DEADLINE_S = 512, 256, 32, 230


def _deadline(signum, frame):
    raise TimeoutError(f"gptfast check passed its {DEADLINE_S} s deadline")


def _first_diff_report(model, prompt: list[int], ref: list[int], got: list[int], k: int) -> str:
    """At step k (first difference), the eager logits of the shared prefix: top-2 gap and the two tokens."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt + ref[:k]], device=model.device)  # [1, P + k]
        logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()  # [V]
    top2 = logits.topk(2).values
    gap = (top2[0] - top2[1]).item()
    near_tie = gap <= 2**-6 * top2[0].abs().item()  # a few bf16 ulps (2^-8 relative) of the top logit
    return (f" first_diff={k} eager={ref[k]} compiled={got[k]} top2_gap={gap:.4f}"
            f" logit_drop={(logits[ref[k]] - logits[got[k]]).item():.4f} near_tie={near_tie}")


def main() -> int:
    import torch
    from torch._dynamo.utils import counters

    from open_autoglm.bench.offline import random_prompts
    from open_autoglm.bench.peers import gpt_fast_run, load_hf_model
    from open_autoglm.models.arch_configs import random_model_folder

    if not torch.cuda.is_available():
        print("gptfast check needs a CUDA GPU")
        return 1
    t0 = time.perf_counter()
    folder = random_model_folder("qwen2.5-1.5b", tempfile.mkdtemp())
    torch.manual_seed(0)
    model = load_hf_model(str(folder), torch.bfloat16, "cuda", random_weights=True, attn="sdpa")
    prompt = random_prompts(1, INPUT_LEN, model.config.vocab_size, seed=0)[0]
    print(f"model ready in {time.perf_counter() - t0:.1f} s "
          f"(torch {torch.__version__}, {torch.cuda.get_device_name()})", flush=True)

    ref = gpt_fast_run(model, prompt, CHECK_LEN, compile=False)
    print(f"eager: {ref.decode_tok_s:.1f} tok/s ({time.perf_counter() - t0:.1f} s so far)", flush=True)
    counters.clear()
    run = gpt_fast_run(model, prompt, OUTPUT_LEN)  # compiled, CUDA graphs
    got = run.token_ids[:CHECK_LEN]
    equal = next((k for k, (a, b) in enumerate(zip(ref.token_ids, got)) if a != b), CHECK_LEN)
    line = (f"gptfast tok/s={run.decode_tok_s:.1f} warm_s={run.warmup_s:.1f} tokens_match={equal == CHECK_LEN}"
            f" equal_prefix={equal}/{CHECK_LEN} tokens={len(run.token_ids)}"
            f" graphs={counters['stats']['unique_graphs']} cudagraph_skips={counters['inductor']['cudagraph_skips']}")
    if equal < CHECK_LEN:
        line += _first_diff_report(model, prompt, ref.token_ids, got, equal)
    print(line + f" total_s={time.perf_counter() - t0:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGALRM, _deadline)
    signal.alarm(DEADLINE_S)
    try:
        sys.exit(main())
    except BaseException as e:  # noqa: BLE001 - whatever broke, say it in one place
        if isinstance(e, SystemExit):
            raise
        traceback.print_exc()
        print(f"gptfast FAILED: {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
