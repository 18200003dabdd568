"""Prefix caching: N requests sharing a long prefix, mean time to first token with caching off / on.

    python -m open_autoglm.bench.prefix --random-weights --arch-config qwen2.5-1.5b \\
        --num-prompts 64 --prefix-len 2048 --suffix-len 64 --output-len 16

Each pass: N prompts = one shared random prefix + a unique random suffix, all submitted at once
(offline), exactly output_len tokens each. TTFT = first token time - arrival (add_request).
One engine for both passes: caching is switched on the block manager and the cache emptied
before each pass, and each pass draws a new prefix, so the second pass inherits nothing.
With caching, the first request computes the prefix; the next steps find its blocks
(registered after each step), so later requests prefill only their suffix.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from open_autoglm.bench.common import (
    add_model_args,
    apply_model_args,
    format_stats,
    memory_report,
    write_report,
)
from open_autoglm.cli_args import add_engine_args, engine_config_from_args


def shared_prefix_prompts(num: int, prefix_len: int, suffix_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    low = min(1000, vocab // 2)  # clear of the low ids, where special tokens usually live
    prefix = [rng.randrange(low, vocab) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(low, vocab) for _ in range(suffix_len)] for _ in range(num)]


def run_pass(llm, prompts: list[list[int]], output_len: int, caching: bool) -> dict:
    from open_autoglm.sampling_params import SamplingParams

    bm = llm.engine.block_manager
    bm.enable_prefix_caching = caching
    bm.reset_prefix_cache()
    hits0, queries0 = bm.num_hits, bm.num_queries
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True))
    seconds = time.perf_counter() - start
    ttfts = [o.first_token_time - o.arrival_time for o in outputs]
    return {"caching": caching, "mean_ttft_s": statistics.mean(ttfts), "median_ttft_s": statistics.median(ttfts),
            "max_ttft_s": max(ttfts), "seconds": seconds,
            "cached_tokens": sum(o.num_cached_tokens for o in outputs),
            "hit_rate": (bm.num_hits - hits0) / max(bm.num_queries - queries0, 1)}


def cmd_bench_prefix(args: argparse.Namespace) -> int:
    from open_autoglm.llm import LLM

    apply_model_args(args)
    llm = LLM(config=engine_config_from_args(args))
    vocab = llm.engine.hf_config.vocab_size
    run_pass(llm, shared_prefix_prompts(4, args.prefix_len, args.suffix_len, vocab, args.seed + 99), 2, True)  # warm-up
    rows = [run_pass(llm, shared_prefix_prompts(args.num_prompts, args.prefix_len, args.suffix_len, vocab,
                                                args.seed + i), args.output_len, caching)
            for i, caching in enumerate((False, True))]
    speedup = rows[0]["mean_ttft_s"] / rows[1]["mean_ttft_s"]
    memory = memory_report(llm.engine)
    print("\n" + format_stats(memory))
    print(f"\n{args.num_prompts} requests x ({args.prefix_len} shared + {args.suffix_len} own tokens) -> {args.output_len}")
    print(f"{'prefix cache':<14} {'mean TTFT ms':>13} {'median ms':>10} {'max ms':>9} {'total s':>8} {'cached tok':>11}")
    for r in rows:
        print(f"{'on' if r['caching'] else 'off':<14} {1e3 * r['mean_ttft_s']:>13.1f} {1e3 * r['median_ttft_s']:>10.1f} "
              f"{1e3 * r['max_ttft_s']:>9.1f} {r['seconds']:>8.2f} {r['cached_tokens']:>11}")
    print(f"mean TTFT off / on: {speedup:.1f}x")
    write_report(args.json, {"benchmark": "prefix", "rows": rows, "ttft_speedup": speedup, "memory": memory,
                             "args": {k: v for k, v in vars(args).items() if k != "func"}})
    return 0


def add_bench_prefix_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("prefix", help="mean TTFT of requests sharing a long prefix, prefix cache off vs on")
    _add_args(p)
    return p


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=64, help="requests, all submitted at once")
    p.add_argument("--prefix-len", type=int, default=2048, help="shared prefix length in tokens")
    p.add_argument("--suffix-len", type=int, default=64, help="each request's own tokens after the prefix")
    p.add_argument("--output-len", type=int, default=16, help="output tokens per request (EOS ignored)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    add_model_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_bench_prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m open_autoglm.bench.prefix", description=__doc__.split("\n")[0])
    _add_args(parser)
    return cmd_bench_prefix(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
